"""`moss-speech train --config FILE [--resume DIR]` and `moss-speech train --recipe demo --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="staged (frozen, then joint) speech pre-training of the split model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="training recipe, YAML or JSON (see docs/training.md)")
    src.add_argument("--recipe", choices=["demo"], help="built-in toy experiment (CPU, a few minutes)")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory to continue from")
    p.add_argument("--out", type=Path, default=None, help="output folder (--recipe demo; overrides the config's)")
    p.add_argument("--quick", action="store_true", help="demo: a much shorter run (smoke test, not the figures)")
    p.set_defaults(func=cmd_train)


def build_sources(cfg, builder) -> dict:
    from moss_speech.builders.training.data import load_jsonl

    encode = None
    if cfg.codec is not None:
        from moss_speech.builders.codec.codec import SpeechCodec

        codec = SpeechCodec(cfg.codec)
        encode = codec.encode
    used = {name for stage in cfg.stages for name in stage.data}
    return {name: load_jsonl(src.path, builder, encode) for name, src in cfg.data.items() if name in used}


def cmd_train(args: argparse.Namespace) -> int:
    if args.recipe == "demo":
        from moss_speech.builders.training.demo import run_demo

        run_demo(args.out or Path("demo-train"), quick=args.quick)
        return 0

    import torch

    from moss_speech.builders.llm.checkpoint import load_model
    from moss_speech.builders.llm.prompt import PromptBuilder
    from moss_speech.builders.training.config import TrainConfig
    from moss_speech.builders.training.trainer import Trainer

    cfg = TrainConfig.from_file(args.config)
    if args.out is not None:
        cfg.out = args.out
    model = load_model(cfg.init, dtype=torch.float32)
    builder = PromptBuilder.from_dir(cfg.init, model.config)
    sources = build_sources(cfg, builder)
    for name, samples in sources.items():
        kinds = sorted({s.kind for s in samples})
        print(f"data {name}: {len(samples)} samples ({', '.join(kinds)})")
    if args.resume is not None:
        trainer = Trainer.resume(args.resume, cfg, sources)
    else:
        trainer = Trainer(model, cfg, sources)
    final = trainer.run()
    print(f"trained model (fnlp/MOSS-Speech layout) -> {final}")
    return 0
