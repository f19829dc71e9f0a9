"""`moss-speech checkpoint tiny` and `moss-speech generate` (in-process, reference runtime)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    ck = sub.add_parser("checkpoint", help="make checkpoints")
    ck_sub = ck.add_subparsers(dest="checkpoint_command", metavar="KIND", required=True)
    tiny = ck_sub.add_parser("tiny", help="seeded random checkpoint + codec in the real layouts")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-codec", action="store_true", help="only the LLM checkpoint")
    tiny.add_argument("--small-vocab", action="store_true",
                      help="a 288-token text vocabulary (special tokens from id 256) instead of the real 151,680")
    tiny.set_defaults(func=cmd_checkpoint_tiny)

    gen = sub.add_parser("generate", help="generate in process with the PyTorch reference runtime")
    gen.add_argument("--checkpoint", type=Path, required=True)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the user's turn as text")
    src.add_argument("--codes", help="the user's turn as comma-separated speech codes")
    gen.add_argument("--output", choices=["speech", "text"], default="speech", help="answer modality")
    gen.add_argument("--system-prompt", default=None)
    gen.add_argument("--greedy", action="store_true")
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=20)
    gen.add_argument("--repetition-penalty", type=float, default=1.1)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    gen.set_defaults(func=cmd_generate)


def cmd_checkpoint_tiny(args: argparse.Namespace) -> int:
    from moss_speech.builders.tiny import CODEC_SUBDIR, write_tiny_bundle

    cfg = write_tiny_bundle(args.out, seed=args.seed, codec=not args.no_codec, small_vocab=args.small_vocab)
    print(f"tiny LLM checkpoint ({cfg.num_shared_layers}+{cfg.num_modality_layers} layers, "
          f"hidden {cfg.hidden_size}, text vocabulary {cfg.vocab_size}) -> {args.out}")
    if not args.no_codec:
        print(f"tiny codec -> {args.out / CODEC_SUBDIR}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moss_speech.builders.llm.generate import SamplingParams, generate
    from moss_speech.builders.llm.model import MossSpeechForCausalLM
    from moss_speech.builders.llm.prompt import PromptBuilder, Turn

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = MossSpeechForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    builder = PromptBuilder.from_dir(args.checkpoint, model.config)  # every token id from the checkpoint
    if args.text is not None:
        turn = Turn("user", text=args.text)
    else:
        turn = Turn("user", codes=[int(c) for c in args.codes.split(",") if c.strip()])
    prompt = builder.build([turn], args.output, system_prompt=args.system_prompt)
    params = SamplingParams(
        do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, seed=args.seed,
    )
    result = generate(model, [prompt], params, builder.tokens)[0]
    answer = {
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": len(result.steps),
        "stop_reason": result.stop_reason,
        "speech_codes": result.speech_codes,
        "text": builder.decode_text(result.text_tokens),
    }
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"prompt {answer['prompt_tokens']} rows, generated {answer['generated_tokens']} steps "
              f"({answer['stop_reason']})")
        print(f"speech tokens ({len(answer['speech_codes'])}): {answer['speech_codes']}")
        print(f"text: {answer['text']!r}")
    return 0
