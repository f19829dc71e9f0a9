"""Reference runtime on CPU: prefill and decode tokens/s on the tiny model, and peak RSS of loading a
checkpoint of >= 200 MB as a ratio to its size on disk.

    .venv/bin/python bench/llm_bench.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import median_time, print_table  # noqa: E402

from moss_speech.builders.llm.checkpoint import write_tiny_checkpoint  # noqa: E402
from moss_speech.builders.llm.generate import SamplingParams, generate  # noqa: E402
from moss_speech.builders.llm.model import MossSpeechForCausalLM  # noqa: E402

# A "tiny" shape big enough for a >= 200 MB checkpoint (the vocabularies dominate).
RSS_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64)

# VmHWM (not ru_maxrss, which a child inherits from the forking parent) is this process's own peak.
# Every weight is touched after loading: safetensors tensors may be lazily paged in from the mapped file.
RSS_PROBE = """
import json, sys, torch
from moss_speech.builders.llm.checkpoint import load_model
def status(key):
    line = next(l for l in open('/proc/self/status') if l.startswith(key))
    return int(line.split()[1]) * 1024
base = status('VmRSS')
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
touched = sum(float(torch.amax(p)) for p in model.parameters())  # reads every page, no copy
print(json.dumps({"base": base, "peak": status('VmHWM'), "params": sum(p.numel() for p in model.parameters())}))
"""


def throughput(ckpt: Path, prompt_len: int = 256, new_tokens: int = 64) -> tuple[float, float]:
    model = MossSpeechForCausalLM.from_pretrained(ckpt)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(
        [torch.randint(0, 5000, (prompt_len,), generator=g), torch.full((prompt_len,), cfg.audio_pad_token_id)], dim=-1
    )
    with torch.no_grad():
        prefill = median_time(lambda: model(grid[None], last_only=True), repeats=5)
    params = SamplingParams.greedy(max_new_tokens=new_tokens)
    total = median_time(lambda: generate(model, [grid], params), repeats=3)
    decode = (total - prefill) / (new_tokens - 1)
    return prompt_len / prefill, 1.0 / decode


def peak_rss_ratio(ckpt: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(ckpt), dtype], check=True, capture_output=True, text=True
    ).stdout
    r = json.loads(out)
    disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return {"disk": disk, "delta": r["peak"] - r["base"], "ratio": (r["peak"] - r["base"]) / disk}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llm-bench-"))
    torch.set_num_threads(2)
    tiny = work / "tiny"
    if not (tiny / "config.json").exists():
        write_tiny_checkpoint(tiny)
    prefill, decode = throughput(tiny)
    print_table(
        "reference runtime (torch, CPU, fp32, tiny model, batch 1)",
        [
            ("prefill (256-token prompt)", f"{prefill:,.0f} tokens/s"),
            ("decode (greedy, 64 steps)", f"{decode:,.1f} tokens/s"),
            ("decode / prefill", f"{decode / prefill:.4f}"),
        ],
    )
    big = work / "rss"
    if not (big / "config.json").exists():
        write_tiny_checkpoint(big, max_shard_bytes=128 * 2**20, **RSS_SHAPE)
    rows = []
    for dtype in ("bfloat16", "float32"):
        r = peak_rss_ratio(big, dtype)
        rows.append(
            (
                f"compute {dtype}",
                f"peak RSS growth {r['delta'] / 2**20:,.0f} MiB for "
                f"{r['disk'] / 2**20:,.0f} MiB on disk = {r['ratio']:.2f}x",
            )
        )
    print_table("checkpoint load (bf16 on disk; goal <= 1.2x for same-dtype compute)", rows)


if __name__ == "__main__":
    main()
