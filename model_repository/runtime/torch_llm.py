"""The reference runtime: the PyTorch model with a preallocated, in-place KV cache.

Decode steps gather the live slots' caches into a packed batch only when the live set is not already the
leading slots (`SlotView`); the common steady state (slots 0..B-1 live) reads views of the cache with no copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moss_speech.builders.llm.kv import StaticKVCache
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.model_repository.runtime.base import LLMRuntime, default_context


class TorchLLMRuntime(LLMRuntime):
    name = "torch"

    def __init__(self, model: MossSpeechForCausalLM, max_slots: int = 8, max_context: int | None = None):
        cfg = model.config
        super().__init__(cfg, max_slots, max_context or default_context(cfg))
        self.model = model
        p = next(model.parameters())
        self.cache = StaticKVCache(
            cfg.num_layer_instances,
            max_slots,
            cfg.num_key_value_heads,
            self.max_context,
            cfg.head_dim,
            p.dtype,
            p.device,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw
    ) -> TorchLLMRuntime:
        return cls(MossSpeechForCausalLM.from_pretrained(path, dtype=dtype, device=device), **kw)

    @torch.no_grad()
    def _prefill(self, slot, grid, start=0):
        self.cache.lengths[slot] = start  # rows go after the kept prefix (0 for a fresh slot)
        view = self.cache.view([slot])
        text, audio = self.model(grid[None].to(self.cache.buffer.device), cache=view, last_only=True)
        return text[0].float().cpu(), audio[0].float().cpu()

    @torch.no_grad()
    def _decode(self, slots, rows):
        view = self.cache.view(slots)
        text, audio = self.model(rows[:, None].to(self.cache.buffer.device), cache=view, last_only=True)
        return text.float().cpu(), audio.float().cpu()

    def _on_release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
