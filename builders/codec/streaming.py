"""The stateless vocoder contract shared by the LLM streamer, the Triton vocoder model and the codec.

A `DecodeWindow` carries everything needed to render one chunk of speech: left-context tokens (re-decoded, not
returned), the new chunk, lookahead tokens (empty on the final window), the absolute position of its first
token (seeds the noise), the voice id and the finalize flag. `SpeechCodec.decode_chunk(window)` returns
exactly `n_chunk * samples_per_token` PCM samples. Nothing is remembered between calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moss_speech.builders.codec.config import DEFAULT_VOICE_ID
from moss_speech.contract.streaming import StreamingConfig

SPEECH_CODEBOOK_SIZE = 16384  # codes 0..16383; 16384 is EOSP in the LLM's audio channel, never a speech token


class DecodeWindow(BaseModel):
    model_config = ConfigDict(frozen=True)

    tokens: list[int]  # context + chunk + lookahead
    n_context: int = Field(ge=0)
    n_chunk: int = Field(ge=1)
    first_position: int = Field(ge=0)  # absolute index (in the utterance) of tokens[0]
    voice_id: str = DEFAULT_VOICE_ID
    finalize: bool = False

    @model_validator(mode="after")
    def _check(self) -> DecodeWindow:
        if self.n_context + self.n_chunk > len(self.tokens):
            raise ValueError(f"n_context + n_chunk = {self.n_context + self.n_chunk} > {len(self.tokens)} tokens")
        if self.finalize and self.n_lookahead:
            raise ValueError("a finalize window has no lookahead tokens")
        bad = [t for t in self.tokens if not 0 <= t < SPEECH_CODEBOOK_SIZE]
        if bad:
            raise ValueError(f"speech tokens must be in [0, {SPEECH_CODEBOOK_SIZE}), got {bad[:5]}")
        return self

    @property
    def n_lookahead(self) -> int:
        return len(self.tokens) - self.n_context - self.n_chunk

    @property
    def chunk_position(self) -> int:
        """Absolute index of the first new token."""
        return self.first_position + self.n_context


def chunk_bounds(total: int, cfg: StreamingConfig) -> list[tuple[int, int]]:
    """[start, end) of every chunk of an utterance of `total` tokens: first chunk, then fixed-size chunks."""
    bounds, start = [], 0
    size = cfg.first_chunk_tokens
    while start < total:
        end = min(start + size, total)
        bounds.append((start, end))
        start, size = end, cfg.chunk_tokens
    return bounds


def ready_windows(
    tokens: Sequence[int],
    emitted: int,
    finished: bool,
    cfg: StreamingConfig,
    voice_id: str = DEFAULT_VOICE_ID,
) -> list[DecodeWindow]:
    """Windows that can be decoded now, for an utterance whose first `emitted` tokens are already rendered.

    `tokens` is everything generated so far; a chunk is ready once its lookahead exists, or when `finished`.
    Callers keep only `emitted` (an int) between calls; the windows themselves are independent.
    """
    out = []
    total = len(tokens)
    size = cfg.first_chunk_tokens if emitted == 0 else cfg.chunk_tokens
    start = emitted
    while start < total:
        end = start + size
        if end + cfg.lookahead_tokens <= total:
            look_end, final = end + cfg.lookahead_tokens, False
        elif finished:
            end = min(end, total)
            look_end, final = min(end + cfg.lookahead_tokens, total), end == total
        else:
            break
        ctx_start = max(0, start - cfg.context_tokens)
        out.append(
            DecodeWindow(
                tokens=list(tokens[ctx_start:look_end]),
                n_context=start - ctx_start,
                n_chunk=end - start,
                first_position=ctx_start,
                voice_id=voice_id,
                finalize=final,
            )
        )
        start, size = end, cfg.chunk_tokens
    return out
