"""The interface every LLM runtime implements, and the slot bookkeeping they share.

A runtime owns a preallocated KV cache of `max_slots` sequences x `max_context` tokens. Callers acquire a
slot per request, prefill it with the prompt, then run batched decode steps over any set of live slots
(each slot has its own length), and release it when the request ends or is cancelled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moss_speech.builders.config import MossSpeechConfig, ServingConfig
from moss_speech.builders.llm.generate import ContextLengthError, check_context

__all__ = ["LLMRuntime", "NoFreeSlotError", "ContextLengthError"]


class NoFreeSlotError(RuntimeError):
    """Every KV slot is taken: the caller should queue the request (or answer RESOURCE_EXHAUSTED)."""


def default_context(config: MossSpeechConfig) -> int:
    """KV tokens per slot when the caller names none: the serving config's default, never the model's whole
    `max_position_embeddings` (40,960 for the real model: 8 slots of that are tens of GiB of cache)."""
    return min(ServingConfig.model_fields["max_context"].default, config.max_position_embeddings)


class LLMRuntime(ABC):
    name: str = "base"

    def __init__(self, config: MossSpeechConfig, max_slots: int, max_context: int):
        if max_context > config.max_position_embeddings:
            raise ValueError(f"max_context {max_context} exceeds the model's context "
                             f"{config.max_position_embeddings}")
        self.config = config
        self.max_slots = max_slots
        self.max_context = max_context
        self._free = list(range(max_slots))
        self._lengths = [0] * max_slots

    # --- slots ---------------------------------------------------------------------------------------------
    def acquire(self) -> int:
        if not self._free:
            raise NoFreeSlotError(f"all {self.max_slots} KV slots are in use")
        slot = self._free.pop(0)
        self._lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free:
            return
        self._lengths[slot] = 0
        self._free.append(slot)
        self._free.sort()
        self._on_release(slot)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # --- compute -------------------------------------------------------------------------------------------
    def prefill(self, slot: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prompt grid [L, 2] into an empty slot; returns last-position (text, audio) logits."""
        check_context(grid.shape[0], self.max_context, f"this runtime's context ({self.name})")
        if self._lengths[slot]:
            raise ValueError(f"slot {slot} already holds {self._lengths[slot]} tokens")
        out = self._prefill(slot, grid.to(torch.long))
        self._lengths[slot] = grid.shape[0]
        return out

    def decode(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for each slot: rows [B, 2] -> (text [B, Vt], audio [B, Va]) logits."""
        for s in slots:
            if self._lengths[s] + 1 > self.max_context:
                raise ContextLengthError(f"sequence in slot {s} reached the runtime's context of "
                                         f"{self.max_context} tokens")
        out = self._decode(slots, rows.to(torch.long))
        for s in slots:
            self._lengths[s] += 1
        return out

    @abstractmethod
    def _prefill(self, slot: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _decode(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _on_release(self, slot: int) -> None:  # noqa: B027 - optional hook for runtimes with per-slot state
        return None
