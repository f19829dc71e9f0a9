"""Tiny-codec CPU benchmark: encoder RTF, decoder RTF (offline and streamed), first-chunk latency.

Usage: python bench/codec_bench.py [--codec DIR] [--seconds 8] [--threads 2]
RTF = compute time / audio duration (lower is better). All figures come from the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import best_time  # bench/ is on sys.path when a script here runs

from moss_speech.builders.codec import SpeechCodec, ready_windows
from moss_speech.builders.codec.tiny import write_tiny_codec
from moss_speech.contract.streaming import StreamingConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", type=Path, default=None, help="codec dir (default: a fresh tiny codec)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = None
    if args.codec is None:
        tmp = tempfile.TemporaryDirectory()
        args.codec = Path(tmp.name)
        write_tiny_codec(args.codec)
    cfg = StreamingConfig()
    codec = SpeechCodec(args.codec, streaming=cfg)
    codec.voices.get()  # voice prompt computed once, not timed

    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal(int(16000 * args.seconds))).astype(np.float32)
    codec.encode(pcm, 16000)  # warm-up
    enc = best_time(lambda: codec.encode(pcm, 16000), args.repeats, warmup=0)

    codes = [int(c) for c in rng.integers(0, 16384, int(round(12.5 * args.seconds)))]
    audio_s = len(codes) * codec.samples_per_token / codec.sample_rate
    codec.decode(codes[:10])
    off = best_time(lambda: codec.decode(codes), args.repeats, warmup=0)
    streamed = best_time(lambda: codec.decode_streaming(codes), 1, warmup=0)
    first = ready_windows(codes[: cfg.first_chunk_tokens + cfg.lookahead_tokens], 0, False, cfg)[0]
    first_lat = best_time(lambda: codec.decode_chunk(first), args.repeats * 3, warmup=0)
    windows = ready_windows(codes, 0, True, cfg)
    steady = windows[len(windows) // 2]
    steady_lat = best_time(lambda: codec.decode_chunk(steady), args.repeats * 3, warmup=0)
    chunk_s = cfg.chunk_tokens * codec.samples_per_token / codec.sample_rate

    print(
        f"tiny codec on CPU, {args.threads} threads, {args.seconds:.1f} s audio; "
        f"chunk {cfg.chunk_tokens} tokens, first chunk {cfg.first_chunk_tokens}, "
        f"lookahead {cfg.lookahead_tokens}, context {cfg.context_tokens}"
    )
    rows = [
        ("encoder RTF (16 kHz PCM -> codes)", f"{enc / args.seconds:.4f}"),
        ("decoder RTF offline (one pass)", f"{off / audio_s:.4f}"),
        ("decoder RTF streamed (all windows)", f"{streamed / audio_s:.4f}"),
        (
            "first-chunk decode latency",
            f"{first_lat * 1000:.1f} ms ({first.n_chunk} tokens = {first.n_chunk * 80} ms audio)",
        ),
        ("steady chunk decode latency", f"{steady_lat * 1000:.1f} ms (chunk RTF {steady_lat / chunk_s:.3f})"),
        ("streamed / offline compute", f"{streamed / off:.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
