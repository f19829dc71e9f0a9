"""`moss-speech build`: checkpoints -> Triton model repository."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="export the models and write a Triton model repository")
    p.add_argument("--checkpoint", type=Path, required=True, help="fnlp/MOSS-Speech layout directory")
    p.add_argument("--codec", type=Path, required=True, help="fnlp/MOSS-Speech-Codec layout directory")
    p.add_argument(
        "--target",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu: onnxruntime on KIND_CPU; gpu: TensorRT engines on KIND_GPU (run engines on a GPU)",
    )
    p.add_argument("--out", type=Path, required=True, help="model repository to write")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="build cache (exported graphs, timing caches), kept for rebuilds; default: the sibling "
        "folder <out>.build-cache (on the same filesystem, so served files are hard links)",
    )
    p.add_argument("--llm-runtime", choices=["torch", "onnxruntime", "tensorrt"], default=None)
    p.add_argument("--codec-backend", choices=["torch", "onnxruntime", "tensorrt"], default=None)
    p.add_argument("--max-slots", type=int, default=None, help="concurrent sequences (KV slots)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per sequence")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument(
        "--max-inflight-requests",
        type=int,
        default=None,
        help="ensemble max_inflight_requests (newer tritonserver only; 2.51 rejects the field)",
    )
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=None,
        help="longest AUDIO the speech encoder accepts (default: the contract's MAX_AUDIO_SECONDS)",
    )
    p.add_argument("--force", action="store_true", help="rebuild every artifact")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from moss_speech.builders.export.build import build_repository
    from moss_speech.contract.serving import ServingConfig

    overrides = {
        k: v
        for k, v in {
            "llm_runtime": args.llm_runtime,
            "codec_backend": args.codec_backend,
            "max_slots": args.max_slots,
            "max_context": args.max_context,
            "dtype": args.dtype,
            "max_inflight_requests": args.max_inflight_requests,
            "max_audio_seconds": args.max_audio_seconds,
        }.items()
        if v is not None
    }
    serving = ServingConfig.for_target(args.target, **overrides)
    manifest = build_repository(
        args.checkpoint,
        args.codec,
        args.target,
        args.out,
        serving,
        progress=not args.quiet,
        force=args.force,
        cache_dir=args.cache_dir,
    )
    built = {k: ("cached" if v.get("skipped") else f"{v['seconds']} s") for k, v in manifest["artifacts"].items()}
    print(json.dumps({"repository": str(args.out), "artifacts": built}, indent=2), file=sys.stdout)
    return 0
