"""The tiny bundle `moss-speech checkpoint tiny` writes: a seeded random LLM checkpoint and, in ./codec, a codec,
both in the real layouts. Tests, benchmarks and the demo all start from it."""

from __future__ import annotations

from pathlib import Path

from moss_speech.builders.config import MossSpeechConfig

CODEC_SUBDIR = "codec"


def write_tiny_bundle(
    out: str | Path, seed: int = 0, codec: bool = True, small_vocab: bool = False
) -> MossSpeechConfig:
    """`small_vocab`: the LLM has a 288-token text vocabulary (see `write_tiny_checkpoint`)."""
    from moss_speech.builders.codec.tiny import write_tiny_codec
    from moss_speech.builders.llm.checkpoint import write_tiny_checkpoint

    out = Path(out)
    cfg = write_tiny_checkpoint(out, seed=seed, small_vocab=small_vocab)
    if codec:
        write_tiny_codec(out / CODEC_SUBDIR, seed=seed)
    return cfg
