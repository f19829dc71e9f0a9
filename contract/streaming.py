"""Streaming sizes of the vocoder, in speech tokens (80 ms each): one definition for `ServingConfig` (what a
repository is built with) and the codec (how windows are cut)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamingSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk_tokens: int = Field(5, ge=1, description="new tokens decoded per window (0.4 s)")
    first_chunk_tokens: int = Field(5, ge=1, description="size of the first chunk (smaller = earlier first audio)")
    lookahead_tokens: int = Field(3, ge=0, description="tokens after the chunk the flow sees (= pre_lookahead_len)")
    context_tokens: int = Field(20, ge=0, description="left-context tokens re-decoded with every window")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in StreamingSizes.model_fields}


class StreamingConfig(StreamingSizes):
    """How the vocoder is driven."""

    chunk_mask: bool = Field(True, description="chunk-causal attention in the flow (the reference streaming mode)")
