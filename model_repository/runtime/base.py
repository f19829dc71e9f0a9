"""The interface every LLM runtime implements, and the slot bookkeeping they share.

A runtime owns a preallocated KV cache of `max_slots` sequences x `max_context` tokens. Callers acquire a
slot per request, prefill it with the prompt, then run batched decode steps over any set of live slots
(each slot has its own length), and release it when the request ends or is cancelled.

Prefix reuse: the runtime records the grid rows whose K/V each slot holds. A finished request may release its
slot with `keep=True`: the slot stays cached (idle, LRU) with its rows. `acquire_for(prompt)` takes the cached slot
sharing the longest prefix with the new prompt, keeps that prefix's K/V (causal attention: position i's K/V depend
only on rows 0..i) and `prefill` then computes only the rest. Cached slots are the idle slots of the same
preallocated cache, so the cache costs no memory beyond it; the least recently used one is evicted whenever a
request needs a slot and none is free. Runtimes implement `_prefill(slot, rows, start)` for rows placed after
`start` cached positions (torch, onnxruntime and TensorRT graphs all take a past).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.generate import ContextLengthError, check_context
from moss_speech.contract.serving import ServingConfig

__all__ = ["LLMRuntime", "NoFreeSlotError", "ContextLengthError"]


class NoFreeSlotError(RuntimeError):
    """Every KV slot is taken: the caller should queue the request (or answer RESOURCE_EXHAUSTED)."""


def default_context(config: MossSpeechConfig) -> int:
    """KV tokens per slot when the caller names none: the serving config's default, never the model's whole
    `max_position_embeddings` (40,960 for the real model: 8 slots of that are tens of GiB of cache)."""
    return min(ServingConfig.model_fields["max_context"].default, config.max_position_embeddings)


@dataclass
class PrefixCacheStats:
    """Counters of the prefix cache (the llm adapter exports them as metrics)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    reused_rows: int = 0  # prompt rows not recomputed thanks to a hit


class LLMRuntime(ABC):
    name: str = "base"

    def __init__(self, config: MossSpeechConfig, max_slots: int, max_context: int):
        if max_context > config.max_position_embeddings:
            raise ValueError(f"max_context {max_context} exceeds the model's context {config.max_position_embeddings}")
        self.config = config
        self.max_slots = max_slots
        self.max_context = max_context
        self._free = list(range(max_slots))
        self._lengths = [0] * max_slots
        # Grid rows whose K/V each slot holds (positions 0..length-1), for prefix matching.
        self._rows = torch.zeros(max_slots, max_context, 2, dtype=torch.long)
        self._cached: OrderedDict[int, str | None] = OrderedDict()  # idle slots keeping K/V -> key, LRU first
        self.prefix_cache = True  # the Engine turns it off when asked
        self.min_prefix = 4  # shortest prefix worth reusing, rows
        self.cache_stats = PrefixCacheStats()

    # --- slots ---------------------------------------------------------------------------------------------
    def acquire(self) -> int:
        if not self._free and self._cached:
            self._evict(next(iter(self._cached)))
        if not self._free:
            raise NoFreeSlotError(f"all {self.max_slots} KV slots are in use")
        slot = self._free.pop(0)
        self._lengths[slot] = 0
        return slot

    def acquire_for(self, prompt: torch.Tensor, key: str | None = None) -> tuple[int, int]:
        """A slot for `prompt` [L, 2]: the cached slot with the longest common prefix (its K/V kept for that
        prefix), else a fresh one. Returns (slot, reused rows); `prefill(slot, prompt)` computes the rest.

        `key` (the session id) makes reuse session-affine: a request with a key only takes entries cached under
        that key, so one conversation never cuts another's entry down to a shared system prompt."""
        best, best_len = -1, 0
        if self.prefix_cache and self._cached:
            prompt = prompt.to(torch.long)
            for slot, owner in self._cached.items():
                if key is not None and owner != key:
                    continue
                n = min(self._lengths[slot], prompt.shape[0] - 1)  # the last row is always computed (its logits)
                if n <= best_len:
                    continue
                differ = (self._rows[slot, :n] != prompt[:n]).any(-1).nonzero()
                common = int(differ[0]) if differ.numel() else n
                if common > best_len:
                    best, best_len = slot, common
        # Without a key, while a slot is free, a short shared prefix (another conversation's system prompt, chat
        # markers) does not take a cached slot: that would cut its entry down to the shared part.
        worth = (
            best >= 0
            and best_len >= self.min_prefix
            and (key is not None or not self._free or 4 * best_len >= self._lengths[best])
        )
        if worth:
            del self._cached[best]
            self._lengths[best] = best_len
            self._truncate(best, best_len)
            self.cache_stats.hits += 1
            self.cache_stats.reused_rows += best_len
            return best, best_len
        if self.prefix_cache:
            self.cache_stats.misses += 1
        return self.acquire(), 0

    def release(self, slot: int, keep: bool = False, key: str | None = None) -> None:
        """Free a slot; with `keep` (a request that finished cleanly) its K/V stay cached for a later prefix,
        under `key` (the session id; a newer entry of the same key replaces the older one)."""
        if slot in self._free or slot in self._cached:
            return
        if keep and self.prefix_cache and self._lengths[slot]:
            if key is not None:
                for old in [s for s, k in self._cached.items() if k == key]:
                    self._evict(old)
            self._cached[slot] = key
            return
        self._lengths[slot] = 0
        self._free.append(slot)
        self._free.sort()
        self._on_release(slot)

    def _evict(self, slot: int) -> None:
        del self._cached[slot]
        self.cache_stats.evictions += 1
        self.release(slot)

    def clear_prefix_cache(self) -> None:
        for slot in list(self._cached):
            self._evict(slot)

    @property
    def cached_slots(self) -> int:
        return len(self._cached)

    @property
    def cached_rows(self) -> int:
        return sum(self._lengths[s] for s in self._cached)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    @property
    def free_slots(self) -> int:
        """Slots a new request can take (cached slots are evicted on demand)."""
        return len(self._free) + len(self._cached)

    # --- compute -------------------------------------------------------------------------------------------
    def prefill(self, slot: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prompt grid [L, 2] into a slot; returns last-position (text, audio) logits. A slot from
        `acquire_for` already holds the prompt's first `length(slot)` rows: only the rest is computed."""
        check_context(grid.shape[0], self.max_context, f"this runtime's context ({self.name})")
        grid = grid.to(torch.long)
        start = self._lengths[slot]
        if start >= grid.shape[0] or not torch.equal(self._rows[slot, :start], grid[:start]):
            raise ValueError(f"slot {slot} holds {start} tokens that are not a proper prefix of the prompt")
        out = self._prefill(slot, grid[start:], start)
        self._rows[slot, start : grid.shape[0]] = grid[start:]
        self._lengths[slot] = grid.shape[0]
        return out

    def decode(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for each slot: rows [B, 2] -> (text [B, Vt], audio [B, Va]) logits."""
        for s in slots:
            if self._lengths[s] + 1 > self.max_context:
                raise ContextLengthError(
                    f"sequence in slot {s} reached the runtime's context of {self.max_context} tokens"
                )
        rows = rows.to(torch.long)
        out = self._decode(slots, rows)
        for i, s in enumerate(slots):
            self._rows[s, self._lengths[s]] = rows[i]
            self._lengths[s] += 1
        return out

    @abstractmethod
    def _prefill(self, slot: int, grid: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute rows `grid` at positions start.. of `slot`, whose first `start` positions hold valid K/V."""

    @abstractmethod
    def _decode(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _on_release(self, slot: int) -> None:  # noqa: B027 - optional hook for runtimes with per-slot state
        return None

    def _truncate(self, slot: int, length: int) -> None:  # noqa: B027 - runtimes that track lengths themselves
        """A cached slot now keeps only its first `length` positions (the shared prefix)."""
        return None
