"""Decode tokens/s of the torch LLM runtime on a model of the REAL shape (random weights), at batch 1 and 8,
against the GPU's memory-bandwidth limit (weight bytes read per step / bandwidth).

For a lent GPU machine (the device tool): `python bench/gpu_decode_bench.py --device cuda`. On a CPU it runs a
small shape (`--small`) only to check the script. Also prints the prefill time of one prompt and the GPU memory
the weights, the KV cache and the peak take (docs/gpu-verification.md items 4 and 5).

    python bench/gpu_decode_bench.py --device cuda [--bandwidth-tbs 3.35] [--context 1024] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table  # noqa: E402

from moss_speech.builders.config import MossSpeechConfig, tiny_config  # noqa: E402
from moss_speech.builders.llm.checkpoint import skip_weight_init  # noqa: E402
from moss_speech.builders.llm.model import MossSpeechForCausalLM  # noqa: E402
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime  # noqa: E402

BATCHES = (1, 8, 32)
# Peak HBM bandwidth by device name (TB/s); pass --bandwidth-tbs for anything else.
BANDWIDTH_TBS = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100-SXM4-80GB": 2.04}


def random_model(cfg: MossSpeechConfig, device: str, dtype: torch.dtype) -> MossSpeechForCausalLM:
    with torch.device(device), skip_weight_init():
        model = MossSpeechForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range)
    return model.eval()


def bytes_per_step(model: MossSpeechForCausalLM) -> int:
    """Weights a decode step reads: every layer and both heads; of the embedding tables only a row per token."""
    skip = {"model.embed_tokens.weight", "model.audio_embed.weight"}
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in skip)


def prompt_grid(runtime: TorchLLMRuntime, length: int) -> torch.Tensor:
    """A random text prompt of `length` rows (audio channel padded)."""
    pad = runtime.config.audio_pad_token_id
    return torch.stack([torch.randint(0, 5000, (length,)), torch.full((length,), pad)], -1)


def synchronizer(device: str):
    """What waits for queued GPU work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def decode_rate(runtime: TorchLLMRuntime, batch: int, prompt: int, steps: int, device: str) -> float:
    cfg = runtime.config
    slots = [runtime.acquire() for _ in range(batch)]
    grid = prompt_grid(runtime, prompt)
    for s in slots:
        runtime.prefill(s, grid)
    rows = torch.stack([torch.full((batch,), cfg.modality_pad_token_id), torch.randint(0, 16384, (batch,))], -1)
    runtime.decode(slots, rows)  # warm up
    sync = synchronizer(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        runtime.decode(slots, rows)
    sync()
    elapsed = time.perf_counter() - t0
    for s in slots:
        runtime.release(s)
    return batch * steps / elapsed


def prefill_ms(runtime: TorchLLMRuntime, prompt: int, device: str, repeats: int = 3) -> float:
    """Best-of-`repeats` time to prefill one `prompt`-token grid into a fresh slot (time to first token, model only)."""
    grid = prompt_grid(runtime, prompt)
    sync = synchronizer(device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        slot = runtime.acquire()
        sync()
        t0 = time.perf_counter()
        runtime.prefill(slot, grid)
        sync()
        best = min(best, time.perf_counter() - t0)
        runtime.release(slot)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shape (script check on a CPU)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--bandwidth-tbs", type=float, default=None)
    args = ap.parse_args()
    small = args.small or not args.device.startswith("cuda")
    cfg = tiny_config() if small else MossSpeechConfig()
    dtype = getattr(torch, args.dtype)
    model = random_model(cfg, args.device, dtype)
    cuda = args.device.startswith("cuda")
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    runtime = TorchLLMRuntime(model, max_slots=max(BATCHES), max_context=args.context, cuda_graphs=False)
    kv_gib = runtime.cache.buffer.numel() * runtime.cache.buffer.element_size() / 2**30
    name = torch.cuda.get_device_name() if cuda else "cpu"
    bw = args.bandwidth_tbs or next((v for k, v in BANDWIDTH_TBS.items() if k in name), None)
    per_step = bytes_per_step(model)
    rows = [
        ("device", name),
        ("shape", "tiny (script check)" if small else "real (Qwen3-8B trunk + 2x4 tails)"),
        ("weights read per decode step", f"{per_step / 2**30:.2f} GiB ({args.dtype})"),
    ]
    rows.append((f"prefill {args.prompt} tokens (batch 1)", f"{prefill_ms(runtime, args.prompt, args.device):.1f} ms"))
    eager = {}
    for mode in ("eager", "CUDA graphs") if cuda else ("eager",):
        if mode != "eager":  # the same runtime with graphs: a second cache of the same size, after the first
            del runtime
            torch.cuda.empty_cache()
            runtime = TorchLLMRuntime(model, max_slots=max(BATCHES), max_context=args.context, cuda_graphs=True)
        for batch in BATCHES:
            rate = decode_rate(runtime, batch, args.prompt, args.steps, args.device)
            line = f"{rate:,.1f} tokens/s ({rate / batch:,.1f} per sequence)"
            if bw:
                limit = bw * 1e12 / per_step  # steps/s if every step only streamed the weights once
                line += f"; bandwidth limit {limit * batch:,.1f} tokens/s -> {rate / (limit * batch):.0%} of it"
            if mode == "eager":
                eager[batch] = rate
            else:
                line += f"; {rate / eager[batch]:.2f}x eager"
            rows.append((f"decode batch {batch}, {mode}", line))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append(
            (
                "GPU memory",
                f"weights {weights_gib:.2f} GiB, KV cache {kv_gib:.2f} GiB ({max(BATCHES)} slots x {args.context}), "
                f"peak allocated {peak:.2f} GiB",
            )
        )
    print_table("torch runtime decode (static KV cache; eager and CUDA-graph steps, same run)", rows)


if __name__ == "__main__":
    main()
