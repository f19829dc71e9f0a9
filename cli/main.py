"""`moss-speech` console script.

Each area of the project owns its subcommands in its own module, which exposes
`register(subparsers: argparse._SubParsersAction) -> None`; registered handlers are set with
`parser.set_defaults(func=handler)` and receive the parsed namespace, returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in help order. A module that is not part of this build is skipped.
COMMAND_MODULES = (
    "moss_speech.cli.model",
    "moss_speech.cli.build",
    "moss_speech.cli.train",
    "moss_speech.cli.triton",
    "moss_speech.cli.service",
    "moss_speech.cli.demo",
    "moss_speech.cli.up",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss-speech", description="MOSS-Speech serving stack on Triton")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # this area is not present
            raise
        module.register(sub)
    return parser


# Errors that describe bad input (a wrong directory, an inconsistent config, audio that cannot be used):
# printed as one line, not as a traceback.
USER_ERRORS = (
    "ConfigError",
    "CheckpointError",
    "CodecConfigError",
    "BuildError",
    "ContextLengthError",
    "AudioError",
    "TritonStartError",
)


# The base install is the service; these come with the `model` extra (pyproject.toml).
MODEL_EXTRA_MODULES = ("torch", "safetensors", "tokenizers", "yaml", "tqdm", "onnx", "onnxruntime", "jinja2")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        if e.name not in MODEL_EXTRA_MODULES:
            raise
        print(
            f"moss-speech {args.command}: error: needs `{e.name}`, part of the `model` extra: "
            "pip install 'moss-speech-triton[model]'",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        if type(e).__name__ not in USER_ERRORS:
            raise
        print(f"moss-speech {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
