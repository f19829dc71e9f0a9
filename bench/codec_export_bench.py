"""Codec export benchmark (one run, same machine): torch vs onnxruntime behind CodecRuntime.

Figures: export time and artifact sizes; encoder RTF (encode_pcm); latency of one steady vocoder window
(context 20 + chunk 5 + lookahead 3 tokens) and its ratio; 4 windows in one decode_windows call vs 4 calls.
Usage: python bench/codec_export_bench.py [--codec DIR] [--threads 1] [--seconds 8] [--repeats 5] [--json PATH]
Default codec: a fresh tiny codec (CPU-sized; real-codec numbers need the real checkpoint and a GPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import best_time  # bench/ is on sys.path when a script here runs

from moss_speech.builders.codec import SpeechCodec, ready_windows
from moss_speech.builders.codec.tiny import write_tiny_codec
from moss_speech.builders.export.onnx_codec import export_codec_onnx
from moss_speech.contract.streaming import StreamingConfig
from moss_speech.model_repository.runtime.codec_runtime import CodecRuntime


def speechlike(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.7 * t)) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12)) * np.clip(np.sin(2 * np.pi * 3.2 * t), 0, None)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", type=Path, default=None, help="codec dir (default: a fresh tiny codec)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    if args.codec is None:
        args.codec = work / "codec"
        write_tiny_codec(args.codec)
    cfg = StreamingConfig()

    t = time.perf_counter()
    infos = export_codec_onnx(args.codec, work / "onnx", streaming=cfg)
    export_s = time.perf_counter() - t
    runtimes = {
        "torch": CodecRuntime.from_artifacts(args.codec, work / "onnx", "torch", threads=args.threads),
        "onnxruntime": CodecRuntime.from_artifacts(args.codec, work / "onnx", "onnxruntime", threads=args.threads),
    }
    pcm = speechlike(args.seconds)
    codes = [int(c) for c in np.random.default_rng(0).integers(0, 16384, 60)]
    windows = ready_windows(codes, 0, True, cfg)
    steady = [w for w in windows if w.n_context == cfg.context_tokens and w.n_lookahead == cfg.lookahead_tokens]
    four = steady[:4]
    assert len(four) == 4 and len(four[0].tokens) == 28

    res: dict = {
        "threads": args.threads,
        "export_s": round(export_s, 2),
        "artifacts_mb": {k: round(v.bytes / 1e6, 2) for k, v in infos.items()},
        "graph_export_s": {k: v.seconds for k, v in infos.items()},
    }
    for name, rt in runtimes.items():
        enc = best_time(lambda rt=rt: rt.encode_pcm([pcm]), args.repeats)
        one = best_time(lambda rt=rt: rt.decode_windows([four[0]]), args.repeats)
        batched = best_time(lambda rt=rt: rt.decode_windows(four), args.repeats)
        singles = best_time(lambda rt=rt: [rt.decode_windows([w]) for w in four], args.repeats)
        res[name] = {
            "encoder_rtf": round(enc / args.seconds, 5),
            "window_ms": round(1e3 * one, 2),
            "batch4_ms": round(1e3 * batched, 2),
            "4_singles_ms": round(1e3 * singles, 2),
            "batch4_speedup": round(singles / batched, 2),
        }
    codec = SpeechCodec(args.codec, streaming=cfg)
    res["reference_decode_chunk_ms"] = round(1e3 * best_time(lambda: codec.decode_chunk(four[0]), args.repeats), 2)
    res["window_ratio_torch_over_ort"] = round(res["torch"]["window_ms"] / res["onnxruntime"]["window_ms"], 2)
    res["encoder_ratio_torch_over_ort"] = round(res["torch"]["encoder_rtf"] / res["onnxruntime"]["encoder_rtf"], 2)

    print(f"codec {args.codec}  threads {args.threads}  export {res['export_s']} s  artifacts {res['artifacts_mb']} MB")
    print(f"{'backend':12s} {'enc RTF':>9s} {'window ms':>10s} {'4 batched ms':>13s} {'4 single ms':>12s} {'x':>5s}")
    for name in runtimes:
        r = res[name]
        print(
            f"{name:12s} {r['encoder_rtf']:9.5f} {r['window_ms']:10.2f} {r['batch4_ms']:13.2f} "
            f"{r['4_singles_ms']:12.2f} {r['batch4_speedup']:5.2f}"
        )
    print(
        f"torch/ort: encoder {res['encoder_ratio_torch_over_ort']}x, window {res['window_ratio_torch_over_ort']}x; "
        f"SpeechCodec.decode_chunk {res['reference_decode_chunk_ms']} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
