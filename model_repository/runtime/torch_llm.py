"""The reference runtime: the PyTorch model with a preallocated, in-place KV cache.

Decode steps gather the live slots' caches into a packed batch only when the live set is not already the
leading slots (`SlotView`); the common steady state (slots 0..B-1 live) reads views of the cache with no copy.
On a GPU, decode steps replay CUDA graphs (cuda_graphs.py): an eager step is bound by kernel launches there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moss_speech.builders.llm.kv import StaticKVCache
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.model_repository.runtime.base import LLMRuntime, default_context
from moss_speech.model_repository.runtime.cuda_graphs import DecodeGraphs


class TorchLLMRuntime(LLMRuntime):
    name = "torch"

    def __init__(
        self,
        model: MossSpeechForCausalLM,
        max_slots: int = 8,
        max_context: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        """`cuda_graphs`: replay decode steps as CUDA graphs (cuda_graphs.py); default on for a model on a GPU."""
        cfg = model.config
        super().__init__(cfg, max_slots, max_context or default_context(cfg))
        self.model = model
        p = next(model.parameters())
        use_graphs = p.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.cache = StaticKVCache(
            cfg.num_layer_instances,
            max_slots + int(use_graphs),  # graphs point padded rows at one spare slot
            cfg.num_key_value_heads,
            self.max_context,
            cfg.head_dim,
            p.dtype,
            p.device,
        )
        # On a CPU (tests) the same padded steps run eagerly: what a capture records, without CUDA.
        capture = p.device.type == "cuda"
        self.graphs = DecodeGraphs(model, self.cache, max_slots, capture=capture) if use_graphs else None

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
        if self.graphs is not None:
            return self.graphs.decode(slots, rows)
        view = self.cache.view(slots)
        text, audio = self.model(rows[:, None].to(self.cache.buffer.device), cache=view, last_only=True)
        return text.float().cpu(), audio.float().cpu()

    def _on_release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
