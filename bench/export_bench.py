"""LLM export on CPU, tiny model: decode tokens/s of the onnxruntime runtime vs the torch reference runtime
(same run, batch 1 and 4), ONNX export time and artifact sizes, TensorRT-RTX engine build time.

    .venv/bin/python bench/export_bench.py [--work DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import median_time, print_table  # noqa: E402

from moss_speech.builders.export.onnx_llm import export_llm_onnx  # noqa: E402
from moss_speech.builders.export.tensorrt import TensorRTUnavailable, build_engine, llm_profiles  # noqa: E402
from moss_speech.builders.llm.checkpoint import write_tiny_checkpoint  # noqa: E402
from moss_speech.builders.llm.model import MossSpeechForCausalLM  # noqa: E402
from moss_speech.model_repository.runtime.ort_llm import OrtLLMRuntime  # noqa: E402
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime  # noqa: E402

PROMPT, STEPS, CONTEXT = 128, 32, 512


def decode_tps(rt, batch: int, cfg) -> float:
    """Tokens/s of batched decode steps: `batch` slots prefilled with PROMPT tokens, then STEPS steps."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.stack(
        [torch.randint(0, 5000, (PROMPT,), generator=g), torch.full((PROMPT,), cfg.audio_pad_token_id)], dim=-1
    )
    rows = torch.stack(
        [torch.randint(0, 5000, (batch,), generator=g), torch.full((batch,), cfg.audio_pad_token_id)], dim=-1
    )

    def run():
        slots = [rt.acquire() for _ in range(batch)]
        for s in slots:
            rt.prefill(s, prompt)
        t = median_time(lambda: rt.decode(slots, rows), repeats=STEPS, warmup=2)
        for s in slots:
            rt.release(s)
        return t

    return batch / run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    # 1 thread by default: on shared, oversubscribed cores two OpenMP threads wait on each other and torch
    # decode slows ~10x, which would say nothing about either runtime.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="export-bench-"))
    ckpt = work / "tiny"
    write_tiny_checkpoint(ckpt, seed=0)
    model = MossSpeechForCausalLM.from_pretrained(ckpt)
    cfg = model.config

    fp32 = export_llm_onnx(ckpt, work / "llm.onnx")
    fp16 = export_llm_onnx(ckpt, work / "llm16.onnx", dtype="float16")
    rows = [
        ("export fp32 (s)", f"{fp32.seconds:.1f}"),
        ("onnx fp32 (MB, weights inside)", f"{fp32.bytes / 1e6:.1f}"),
        ("export fp16 (s)", f"{fp16.seconds:.1f}"),
        ("onnx fp16 (MB, weights inside)", f"{fp16.bytes / 1e6:.1f}"),
    ]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    for batch in (1, 4):
        ref = TorchLLMRuntime(model, max_slots=4, max_context=CONTEXT)
        onnx_rt = OrtLLMRuntime(fp32.path, cfg, max_slots=4, max_context=CONTEXT, session_options=opts)
        t_ref, t_ort = decode_tps(ref, batch, cfg), decode_tps(onnx_rt, batch, cfg)
        rows += [
            (f"decode b{batch} torch (tok/s)", f"{t_ref:.0f}"),
            (f"decode b{batch} onnxruntime (tok/s)", f"{t_ort:.0f}"),
            (f"decode b{batch} onnxruntime / torch", f"{t_ort / t_ref:.2f}x"),
        ]

    try:
        for info, prec in ((fp32, "fp32"), (fp16, "fp16")):
            eng = build_engine(info.path, work / f"llm-{prec}.plan", llm_profiles(cfg, 4, CONTEXT), precision=prec)
            rows += [
                (f"{eng.backend} build {prec} (s)", f"{eng.seconds:.1f}"),
                (f"{eng.backend} engine {prec} (MB)", f"{eng.bytes / 1e6:.1f}"),
            ]
    except TensorRTUnavailable as e:
        rows.append(("TensorRT build", f"skipped: {e}"))
    print_table(f"LLM export, tiny model, CPU, {args.threads} threads (prompt {PROMPT}, {STEPS} decode steps)", rows)


if __name__ == "__main__":
    main()
