"""Render the contract's tables (tensors, window fields, sampling, streaming, audio) to Markdown.

docs/contracts.md holds them between `BEGIN` and `END`; a unit test fails when they are out of date.
Regenerate after changing the contract:
    python -m moss_speech.contract.docs --write docs/contracts.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from moss_speech.contract import audio, sampling, streaming, window
from moss_speech.contract import tensors as T

BEGIN = "<!-- BEGIN GENERATED: python -m moss_speech.contract.docs --write docs/contracts.md -->"
END = "<!-- END GENERATED -->"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _shape(t: T.Tensor) -> str:
    return "[" + ", ".join(map(str, t.dims)) + "]"


def _flags(t: T.Tensor) -> str:
    return ", ".join(flag for flag, on in (("optional", t.optional), ("ragged", t.ragged)) if on)


def tensor_table(tensors: Iterable[T.Tensor], where: dict[str, str] | None = None) -> str:
    where = where or {}
    return _table(
        ["name", "type", "shape", "", "meaning"],
        (
            [
                f"`{t.name}`" + (f" ({where[t.name]})" if t.name in where else ""),
                t.wire_type,
                _shape(t),
                _flags(t),
                t.meaning,
            ]
            for t in tensors
        ),
    )


def _limits(limits: dict) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{ops[k]} {'2^63' if v == 2**63 else v}" for k, v in limits.items()) or "-"


def _field_limits(info) -> str:
    """The ge/gt/le/lt constraints of a pydantic field."""
    return _limits({k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)})


def render() -> str:
    ens_inputs = [T.AUDIO, T.TEXT, *T.TURN_INPUTS]
    parts = [
        "### Ensembles `s2s` (speech in) and `t2s` (text in)\n\n",
        "Inputs:\n\n",
        tensor_table(ens_inputs, {T.AUDIO.name: T.S2S.name, T.TEXT.name: T.T2S.name}),
        "\nStreamed outputs (every response has all of them; empty arrays when there is nothing new):\n\n",
        tensor_table(T.S2S.outputs),
    ]
    for model in T.PYTHON_MODELS:
        parts += [
            f"\n### Model `{model.name}`\n\n",
            "Inputs:\n\n",
            tensor_table(model.inputs),
            "\nOutputs:\n\n",
            tensor_table(model.outputs),
        ]
    parts += [
        f"\n### `{window.META}` fields (`moss_speech.contract.window.Window`), in order\n\n",
        _table(
            ["index", "field", "meaning"],
            ([str(i), f"`{name}`", window.META_DOC[name]] for i, name in enumerate(window.META_FIELDS)),
        ),
        f"\n### `{T.SAMPLING.name}`: `moss_speech.contract.sampling.SamplingParams` as JSON\n\n",
        _table(
            ["field", "default", "limits", "meaning"],
            (
                [f"`{name}`", f"`{json.dumps(default)}`", _limits(limits), meaning]
                for name, (default, limits, meaning) in sampling.FIELDS.items()
            ),
        ),
        "\n### Streaming sizes (`moss_speech.contract.streaming.StreamingConfig`, also `ServingConfig` fields)\n\n",
        _table(
            ["field", "default", "limits", "meaning"],
            (
                [f"`{name}`", f"`{json.dumps(info.default)}`", _field_limits(info), info.description or ""]
                for name, info in streaming.StreamingConfig.model_fields.items()
            ),
        ),
        "\n### Audio (`moss_speech.contract.audio`)\n\n",
        _table(
            ["constant", "value", "meaning"],
            [
                ["`INPUT_RATE`", f"{audio.INPUT_RATE}", f"Hz of `{T.AUDIO.name}` (the speech encoder's input)"],
                ["`OUTPUT_RATE`", f"{audio.OUTPUT_RATE}", f"Hz of `{T.AUDIO_CHUNK.name}` (the vocoder's output)"],
                [
                    "`MAX_AUDIO_SECONDS`",
                    f"{audio.MAX_AUDIO_SECONDS:g}",
                    "default longest input of one turn: `ServingConfig.max_audio_seconds` (`moss-speech build "
                    "--max-audio-seconds`) and the service's `MOSS_SPEECH_MAX_AUDIO_SECONDS`",
                ],
            ],
        ),
    ]
    return "".join(parts)


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with everything between the `begin` and `end` marker lines replaced by `body` (generated docs)."""
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"the document lacks the markers {begin!r} ... {end!r}")
    return f"{head}{begin}\n{body}{end}{tail}"


def with_tables(text: str) -> str:
    """`text` with everything between BEGIN and END replaced by `render()`."""
    return replace_between(text, BEGIN, END, render())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="update the tables of this markdown file in place")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(with_tables(args.write.read_text()))
    else:
        print(render(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
