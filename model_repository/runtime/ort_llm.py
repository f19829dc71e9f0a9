"""LLM runtime on onnxruntime, over the graph from `builders.export.onnx_llm` (stacked `past_kv` in, only the
new tokens' `new_kv` out).

The KV cache is ONE preallocated numpy buffer [L, 2, slots, kv_heads, max_context, head_dim], each slot's
tokens left-aligned. A decode step over slots of lengths l_b:
  past   = buffer[:, :, slots, :, :P] with P = max(l_b)  (one gather copy of B x P tokens: onnxruntime takes
           only contiguous inputs; the same bytes the graph's attention reads anyway)
  mask   = 1 on each row's first l_b slots and on the new token, 0 on the tail of shorter rows
  pos    = l_b per row
and writes only `new_kv` (B x 1 token) back at each slot's own length. Nothing is reallocated per step
beyond that gather and the graph's own outputs; the cache is never concatenated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.model_repository.runtime.base import LLMRuntime, default_context

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtLLMRuntime(LLMRuntime):
    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        config: MossSpeechConfig,
        max_slots: int = 8,
        max_context: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: ort.SessionOptions | None = None,
    ):
        super().__init__(config, max_slots, max_context or default_context(config))
        self.session = ort.InferenceSession(str(onnx_path), session_options, providers=list(providers))
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = inputs["past_kv"]
        if past.type not in _NP_DTYPES:
            raise ValueError(f"{onnx_path}: past_kv is {past.type}; this runtime serves fp32/fp16 graphs")
        layers, _, _, kv_heads, _, head_dim = past.shape
        want = (config.num_layer_instances, config.num_key_value_heads, config.head_dim)
        if (layers, kv_heads, head_dim) != want:
            raise ValueError(
                f"{onnx_path}: past_kv has (layers, kv_heads, head_dim) = "
                f"{(layers, kv_heads, head_dim)}, the config says {want}"
            )
        self.kv_dtype = _NP_DTYPES[past.type]
        self.cache = np.zeros((layers, 2, max_slots, kv_heads, self.max_context, head_dim), self.kv_dtype)

    def _run(self, grid: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, past: np.ndarray):
        text, audio, new_kv = self.session.run(
            None, {"grid": grid, "position_ids": position_ids, "attention_mask": mask, "past_kv": past}
        )
        return torch.from_numpy(text), torch.from_numpy(audio), new_kv

    def _prefill(self, slot, grid, start=0):
        n = grid.shape[0]
        # The kept prefix's K/V (empty for a fresh slot) as the past; the new rows sit at positions start..
        past = np.ascontiguousarray(self.cache[:, :, slot : slot + 1, :, :start])
        text, audio, new_kv = self._run(
            grid.numpy()[None],
            np.arange(start, start + n, dtype=np.int64)[None],
            np.ones((1, start + n), np.int64),
            past,
        )
        self.cache[:, :, slot, :, start : start + n] = new_kv[:, :, 0]
        return text[0], audio[0]

    def _decode(self, slots, rows):
        idx = np.asarray(slots, dtype=np.int64)
        lengths = np.asarray([self._lengths[s] for s in slots], dtype=np.int64)
        p = int(lengths.max())
        past = self.cache[:, :, idx, :, :p]  # advanced index -> one contiguous copy [L, 2, B, kv, P, D]
        mask = (np.arange(p + 1)[None] < lengths[:, None]).astype(np.int64)
        mask[:, p] = 1  # the new token
        text, audio, new_kv = self._run(rows.numpy()[:, None], lengths[:, None], mask, past)
        # Two advanced indices around a slice put their broadcast dim first: target is [B, L, 2, kv, D].
        self.cache[:, :, idx, :, lengths] = np.moveaxis(new_kv[:, :, :, :, 0], 2, 0)
        return text, audio
