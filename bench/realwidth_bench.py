"""Peak memory and time of every build/serve stage at the real model width, with few layers (not a CI test).

Writes a seeded random checkpoint with the real widths (hidden 4096, intermediate 12288, 32/8 heads, vocab
151,680) and `--layers` shared + text + audio layers, then runs each stage in its own subprocess and reads
its peak RSS (ru_maxrss of the child):

  load-bf16 / load-fp32   `load_model` from the bf16 shards            ratio to the bf16 checkpoint bytes
  generate                bf16 model, one prefill + 8 decode steps      ratio to the bf16 checkpoint bytes
  export-fp32 / -bf16     `export_llm_onnx` from the checkpoint         ratio to the graph's weight bytes
  engine-bf16             `build_engine` (TensorRT-RTX when the datacenter package is absent) from the bf16 graph
                          ratio to the graph's bytes
  cpu-repo                `moss-speech build --target cpu` (stages in their own processes): the largest stage

Peak RSS counts the file-backed pages a stage maps (TensorRT-RTX's parser maps the graph's external data instead
of copying it): page cache the kernel can drop under a memory limit. A sampler thread also records the peak of
RssAnon (every 50 ms), the memory the stage cannot give back; both are reported.

Projection to the real 9.1 B model (32 shared + 4 + 4 layers): every stage's peak is modelled as
`base + ratio x weights`, and the real figure is ratio x the real weight bytes (the ratios are what the
deliverables bound). Usage:

    python bench/realwidth_bench.py --work /tmp/rw                # real width, 1+1+1 layers (minutes, ~15 GiB)
    python bench/realwidth_bench.py --work /tmp/rw --tiny         # the same stages at the tiny size (seconds)
    python bench/realwidth_bench.py --work /tmp/rw --code-at a7d5767   # the stages of another commit ("before")
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
REAL = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151680,
    audio_vocab_size=16512,
)
REAL_LAYERS = (32, 4)  # shared, per tail


def param_count(
    hidden: int, inter: int, heads: int, kv: int, head_dim: int, vocab: int, audio_vocab: int, shared: int, tail: int
) -> int:
    """Parameters of the split model (embeddings, heads, norms and every layer instance)."""
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 2 * head_dim
    layer = attn + 3 * hidden * inter + 2 * hidden
    return 2 * (vocab + audio_vocab) * hidden + (shared + 2 * tail) * layer + 2 * hidden


def ratio(peak_bytes: int, base_bytes: int, weight_bytes: int) -> tuple[float, float]:
    """(peak / weights, (peak - base) / weights): the whole peak, and what the stage adds to the process that
    imported torch and the library (the part that scales with the weights)."""
    if not weight_bytes:
        return float("nan"), float("nan")
    return peak_bytes / weight_bytes, max(0, peak_bytes - base_bytes) / weight_bytes


def project(base_bytes: int, marginal: float, real_weight_bytes: int) -> float:
    """The stage's peak at the real size in GiB: the fixed base plus the marginal ratio x the real weights."""
    return (base_bytes + marginal * real_weight_bytes) / GiB


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def sample_anon_peak(period: float = 0.05) -> dict[str, int]:
    """Start a daemon thread keeping the peak RssAnon (bytes) in the returned dict under "anon_peak"."""
    import threading

    peak = {"anon_peak": 0}

    def run() -> None:
        while True:
            peak["anon_peak"] = max(peak["anon_peak"], _status_kib("RssAnon") * 1024)
            time.sleep(period)

    threading.Thread(target=run, daemon=True).start()
    return peak


# --- stages (each runs as `python realwidth_bench.py --stage NAME ...` in its own process) ---------------------


def _stage(name: str, ckpt: Path, work: Path) -> dict:
    import torch

    import moss_speech.builders.export.build  # noqa: F401 - the imports every stage pays, before the base
    import moss_speech.builders.export.onnx_llm  # noqa: F401
    import moss_speech.builders.export.tensorrt  # noqa: F401
    import moss_speech.model_repository.runtime.torch_llm  # noqa: F401

    torch.set_num_threads(2)
    out: dict = {"base_rss": rss_now()}
    out["_anon"] = sample_anon_peak()
    if name in ("load-bf16", "load-fp32", "generate"):
        from moss_speech.builders.llm.checkpoint import load_model

        dtype = torch.float32 if name == "load-fp32" else torch.bfloat16
        model = load_model(ckpt, dtype=dtype)
        if name == "generate":
            from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

            rt = TorchLLMRuntime(model, max_slots=1, max_context=256)
            slot = rt.acquire()
            grid = torch.stack([torch.arange(32) + 100, torch.full((32,), 16384)], -1)
            rt.prefill(slot, grid)
            for i in range(8):
                rt.decode([slot], torch.tensor([[200 + i, 16384]]))
    elif name.startswith("export-"):
        from moss_speech.builders.export.onnx_llm import export_llm_onnx

        dtype = {"export-fp32": "float32", "export-bf16": "bfloat16"}[name]
        info = export_llm_onnx(ckpt, work / f"llm-{dtype}" / "model.onnx", dtype=dtype)
        out["graph_bytes"] = info.bytes
    elif name == "engine-bf16":
        from moss_speech.builders.config import MossSpeechConfig
        from moss_speech.builders.export.tensorrt import build_engine, llm_profiles

        graph = work / "llm-bfloat16" / "model.onnx"
        profiles = llm_profiles(MossSpeechConfig.from_dir(ckpt), 2, 256)
        info = build_engine(graph, work / "engine" / "model.plan", profiles, precision="bf16")
        out["engine_bytes"], out["backend"] = info.bytes, info.backend
        (work / "engine" / "model.plan").unlink()  # 1.4x the graph on disk; only its size matters here
    elif name == "cpu-repo":
        from moss_speech.builders.export.build import build_repository
        from moss_speech.contract.serving import ServingConfig

        build_repository(
            ckpt,
            ckpt / "codec",
            "cpu",
            work / "repo",
            ServingConfig.for_target("cpu", max_slots=2, max_context=256),
            progress=False,
            force=True,
        )
    else:
        raise SystemExit(f"unknown stage {name}")
    return out


def run_stage(name: str, ckpt: Path, work: Path, python: str = sys.executable, cwd: Path | None = None) -> dict:
    t0 = time.perf_counter()
    script = Path(__file__).resolve()
    proc = subprocess.run(
        [python, str(script), "--stage", name, "--ckpt", str(ckpt), "--work", str(work)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode:
        return {"stage": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result | {"stage": name, "seconds": seconds}


def write_checkpoint(ckpt: Path, tiny: bool, layers: int, shard_bytes: int = 2 * GiB) -> None:
    """The tiny bundle (tokenizer, generation config, codec), then at real width the LLM config and bf16 shards
    written tensor by tensor (seeded normal * 0.02, norms near one): never a whole model in memory."""
    import torch
    from safetensors.torch import save_file

    from moss_speech.builders.config import MossSpeechConfig
    from moss_speech.builders.llm.checkpoint import INDEX_NAME
    from moss_speech.builders.llm.model import MossSpeechForCausalLM
    from moss_speech.builders.tiny import write_tiny_bundle

    if (ckpt / "config.json").is_file():
        return
    write_tiny_bundle(ckpt, seed=0)
    if tiny:
        return
    for old in ckpt.glob("model*.safetensors*"):
        old.unlink()
    layout = dict(num_shared_layers=layers, num_modality_layers=layers, num_hidden_layers=2 * layers)
    cfg = MossSpeechConfig.from_dir(ckpt).model_copy(update=REAL | layout)
    cfg = MossSpeechConfig.model_validate(cfg.model_dump())
    cfg.save(ckpt)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MossSpeechForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        nbytes = shape.numel() * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for k in keys:
            t = torch.randn(shapes[k], generator=gen)
            t = (1.0 + 0.1 * t) if k.endswith("norm.weight") else t * 0.02
            shard[k] = t.to(torch.bfloat16)
            del t
            weight_map[k] = name
            total += shapes[k].numel() * 2
        save_file(shard, ckpt / name, metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (ckpt / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (a smoke run of the same stages)")
    ap.add_argument("--layers", type=int, default=1, help="shared layers = layers per tail")
    ap.add_argument("--stages", default="load-bf16,load-fp32,generate,export-fp32,export-bf16,engine-bf16,cpu-repo")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # child: run one stage, print its result and peak RSS
        info = _stage(args.stage, args.ckpt, args.work)
        info["anon_peak"] = info.pop("_anon")["anon_peak"]
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would start at its parent's RSS.
        peak = _status_kib("VmHWM") * 1024
        # cpu-repo's own stage processes (forked by a small process, so their ru_maxrss is their own peak)
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(json.dumps(info | {"peak_rss": max(peak, children)}))
        return

    from moss_speech.builders.config import MossSpeechConfig

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "ckpt"
    t0 = time.perf_counter()
    write_checkpoint(ckpt, args.tiny, args.layers)
    print(f"checkpoint: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cfg = MossSpeechConfig.from_dir(ckpt)
    n = param_count(
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.audio_vocab_size,
        cfg.num_shared_layers,
        cfg.num_modality_layers,
    )
    real_n = param_count(
        *(
            REAL[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "audio_vocab_size",
            )
        ),
        *REAL_LAYERS,
    )
    bf16 = 2 * n
    rows = []
    for name in args.stages.split(","):
        r = run_stage(name, ckpt, args.work)
        # the stage's own weight bytes: fp32 stages hold fp32 weights; the cpu build's largest stage is the fp32 export
        weights = {"load-fp32": 2 * bf16, "export-fp32": 2 * bf16, "cpu-repo": 2 * bf16}.get(name, bf16)
        r["weights"] = weights
        if "peak_rss" in r:
            r["ratio"], r["marginal"] = ratio(r["peak_rss"], r["base_rss"], weights)
            r["real_gib"] = project(r["base_rss"], r["marginal"], weights // n * real_n)
            r["anon_ratio"] = r["anon_peak"] / weights
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"\nparams {n / 1e9:.2f} B ({bf16 / GiB:.2f} GiB bf16); real model {real_n / 1e9:.2f} B\n")
    print(
        "| stage | seconds | peak RSS GiB | base GiB | weights GiB | peak / weights | (peak - base) / weights "
        "| projected real GiB | anon peak / weights |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['stage']} | {r['seconds']:.0f} | failed: {r['error']} | | | | | | |")
            continue
        print(
            f"| {r['stage']} | {r['seconds']:.0f} | {r['peak_rss'] / GiB:.2f} | {r['base_rss'] / GiB:.2f} | "
            f"{r['weights'] / GiB:.2f} | {r['ratio']:.2f}x | {r['marginal']:.2f}x | {r['real_gib']:.1f} | "
            f"{r['anon_ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
