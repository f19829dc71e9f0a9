"""One speech window as it travels from `llm` to `vocoder`, in three tensors.

`WINDOW_TOKENS` holds context + chunk + lookahead tokens, `VOICE_ID` the voice, and `WINDOW_META` the named
integers below, in `META_FIELDS` order. Every `llm` response carries a window slot; a response without speech
(text, or speech tokens still short of a chunk) has `has_window` false and `chunk_index` -1, and the vocoder
only passes it through. `response_index` numbers the responses of a stream (the ensemble's `SEQ`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS = "WINDOW_TOKENS"
META = "WINDOW_META"
VOICE = "VOICE_ID"
DEFAULT_VOICE = "default"

# name -> meaning, in wire order
META_DOC = {
    "n_context": "left-context tokens at the start of WINDOW_TOKENS (re-decoded, not returned)",
    "n_chunk": "new tokens after the context: the audio this window returns",
    "first_position": "absolute index of the first token in the utterance (seeds the solver noise)",
    "finalize": "1 on the stream's last window (no lookahead)",
    "chunk_index": "0, 1, ... over the windows of a stream; -1 without a window (the response's AUDIO_SEQ)",
    "has_window": "1 when the response carries a window to decode",
    "response_index": "0, 1, ... over the responses of a stream (the response's SEQ)",
}
META_FIELDS: tuple[str, ...] = tuple(META_DOC)  # the first fields of `Window`, in this order (a test pins it)


@dataclass(frozen=True)
class Window:
    n_context: int = 0
    n_chunk: int = 0
    first_position: int = 0
    finalize: bool = False
    chunk_index: int = -1
    has_window: bool = False
    response_index: int = 0
    tokens: tuple[int, ...] = ()
    voice_id: str = DEFAULT_VOICE

    def meta(self) -> list[int]:
        return [int(getattr(self, name)) for name in META_FIELDS]

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The three tensors of one response (batch dimension 1)."""
        return {
            TOKENS: np.array(self.tokens, dtype=np.int64).reshape(1, -1),
            META: np.array([self.meta()], dtype=np.int64),
            VOICE: np.array([[self.voice_id.encode("utf-8")]], dtype=np.object_),
        }

    @classmethod
    def from_tensors(cls, tokens: np.ndarray | None, meta: np.ndarray, voice_id: str | None = None) -> Window:
        """Read one request's tensors (any batch shape of one item); raises ValueError on a malformed meta."""
        values = np.asarray(meta).reshape(-1)
        if values.size != len(META_FIELDS):
            raise ValueError(f"{META} has {values.size} values, expected {len(META_FIELDS)} ({', '.join(META_FIELDS)})")
        named = dict(zip(META_FIELDS, (int(v) for v in values), strict=True))
        named["finalize"], named["has_window"] = bool(named["finalize"]), bool(named["has_window"])
        toks = () if tokens is None else tuple(int(t) for t in np.asarray(tokens).reshape(-1))
        return cls(**named, tokens=toks, voice_id=voice_id or DEFAULT_VOICE)
