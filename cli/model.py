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
    tiny.add_argument(
        "--small-vocab",
        action="store_true",
        help="a 288-token text vocabulary (special tokens from id 256) instead of the real 151,680",
    )
    tiny.set_defaults(func=cmd_checkpoint_tiny)

    gen = sub.add_parser("generate", help="generate in process with the PyTorch reference runtime")
    gen.add_argument("--checkpoint", type=Path, required=True)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the user's turn as text")
    src.add_argument("--codes", help="the user's turn as comma-separated speech codes")
    gen.add_argument("--output", choices=["speech", "text"], default="speech", help="answer modality")
    gen.add_argument("--system-prompt", default=None)
    gen.add_argument("--greedy", action="store_true", help="do_sample=false: argmax, ties to the lowest index")
    add_sampling_flags(gen)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    gen.set_defaults(func=cmd_generate)


# The CLI differs from the contract's defaults in one place: a fixed seed, so repeated runs print the same answer.
CLI_DEFAULTS = {"seed": 0}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per sampling field (except do_sample: --greedy), defaults and meanings from the contract."""
    from moss_speech.contract.sampling import FIELDS

    for name, (default, _, meaning) in FIELDS.items():
        if name == "do_sample":
            continue
        default = CLI_DEFAULTS.get(name, default)
        kind = float if isinstance(default, float) else int
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, default=default, help=f"{meaning} (default {default})"
        )


def sampling_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from moss_speech.contract.sampling import FIELDS, SamplingParams
    from moss_speech.contract.serving import ConfigError

    values = {name: getattr(args, name) for name in FIELDS if name != "do_sample"}
    try:
        return SamplingParams(do_sample=not args.greedy, **{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:  # one line naming the flag, not a traceback
        errs = "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid sampling flags: {errs}") from None


def cmd_checkpoint_tiny(args: argparse.Namespace) -> int:
    from moss_speech.builders.tiny import CODEC_SUBDIR, write_tiny_bundle

    cfg = write_tiny_bundle(args.out, seed=args.seed, codec=not args.no_codec, small_vocab=args.small_vocab)
    print(
        f"tiny LLM checkpoint ({cfg.num_shared_layers}+{cfg.num_modality_layers} layers, "
        f"hidden {cfg.hidden_size}, text vocabulary {cfg.vocab_size}) -> {args.out}"
    )
    if not args.no_codec:
        print(f"tiny codec -> {args.out / CODEC_SUBDIR}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moss_speech.builders.llm.generate import generate
    from moss_speech.builders.llm.model import MossSpeechForCausalLM
    from moss_speech.builders.llm.prompt import PromptBuilder, Turn

    params = sampling_from_args(args)  # bad flags fail before the model loads
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = MossSpeechForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    builder = PromptBuilder.from_dir(args.checkpoint, model.config)  # every token id from the checkpoint
    if args.text is not None:
        turn = Turn("user", text=args.text)
    else:
        turn = Turn("user", codes=[int(c) for c in args.codes.split(",") if c.strip()])
    prompt = builder.build([turn], args.output, system_prompt=args.system_prompt)
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
        print(
            f"prompt {answer['prompt_tokens']} rows, generated {answer['generated_tokens']} steps "
            f"({answer['stop_reason']})"
        )
        print(f"speech tokens ({len(answer['speech_codes'])}): {answer['speech_codes']}")
        print(f"text: {answer['text']!r}")
    return 0
