"""The reference runtime: the PyTorch model with a preallocated, in-place KV cache.

Decode steps gather the live slots' caches into a packed batch only when the live set is not already the
leading slots; the common steady state (slots 0..B-1 live) reads views of the cache with no copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..llm.kv import StaticKVCache
from ..llm.model import MossSpeechForCausalLM
from .base import LLMRuntime


class _SlotView:
    """Cache protocol of `StaticKVCache` for an arbitrary ordered set of slots."""

    def __init__(self, cache: StaticKVCache, slots: list[int]):
        self.cache = cache
        self.slots = slots
        self.index = torch.tensor(slots, dtype=torch.long, device=cache.buffer.device)
        self.contiguous = slots == list(range(len(slots)))

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.cache.lengths[self.index]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        b, _, t, _ = k.shape
        start = c.lengths[self.index]
        end = int(start.max()) + t
        pos = start[:, None] + torch.arange(t, device=k.device)
        rows = self.index[:, None].expand(b, t)
        c.buffer[layer, 0].transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(c.buffer.dtype)
        c.buffer[layer, 1].transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(c.buffer.dtype)
        if self.contiguous:
            return c.buffer[layer, 0, :b, :, :end], c.buffer[layer, 1, :b, :, :end]
        return c.buffer[layer, 0, self.index, :, :end], c.buffer[layer, 1, self.index, :, :end]

    def advance(self, n: int) -> None:
        self.cache.lengths[self.index] += n


class TorchLLMRuntime(LLMRuntime):
    name = "torch"

    def __init__(self, model: MossSpeechForCausalLM, max_slots: int = 8, max_context: int | None = None):
        cfg = model.config
        super().__init__(cfg, max_slots, max_context or cfg.max_position_embeddings)
        self.model = model
        p = next(model.parameters())
        self.cache = StaticKVCache(cfg.num_layer_instances, max_slots, cfg.num_key_value_heads,
                                   self.max_context, cfg.head_dim, p.dtype, p.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        **kw) -> TorchLLMRuntime:
        return cls(MossSpeechForCausalLM.from_pretrained(path, dtype=dtype, device=device), **kw)

    @torch.no_grad()
    def _prefill(self, slot, grid):
        view = _SlotView(self.cache, [slot])
        text, audio = self.model(grid[None].to(self.cache.buffer.device), cache=view, last_only=True)
        return text[0].float().cpu(), audio[0].float().cpu()

    @torch.no_grad()
    def _decode(self, slots, rows):
        view = _SlotView(self.cache, list(slots))
        text, audio = self.model(rows[:, None].to(self.cache.buffer.device), cache=view, last_only=True)
        return text.float().cpu(), audio.float().cpu()

    def _on_release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
