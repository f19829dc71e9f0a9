"""OrtLLMRuntime beyond the shared conformance test: context limits, the preallocated cache, config checks,
fp16 graphs. (Prefill/decode parity and greedy generation: tests/runtime/test_runtime_conformance.py.)"""

from __future__ import annotations

import pytest
import torch

from moss_speech.builders.config import tiny_config
from moss_speech.builders.llm.generate import ContextLengthError
from moss_speech.model_repository.runtime.ort_llm import OrtLLMRuntime
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 5000, (n,), generator=g), torch.full((n,), 512)], dim=-1)


def test_context_limits_raise_context_length_error(tiny_llm_onnx, tiny_model):
    rt = OrtLLMRuntime(tiny_llm_onnx.path, tiny_model.config, max_slots=2, max_context=16)
    slot = rt.acquire()
    with pytest.raises(ContextLengthError, match=r"16 tokens.*16 tokens"):
        rt.prefill(slot, rows(16, 0))  # no room left for a generated token
    assert rt.length(slot) == 0
    rt.prefill(slot, rows(13, 0))
    for i in range(3):
        rt.decode([slot], rows(1, i))
    assert rt.length(slot) == 16
    with pytest.raises(ContextLengthError, match="16 tokens"):
        rt.decode([slot], rows(1, 9))
    assert rt.length(slot) == 16  # nothing written past the buffer
    with pytest.raises(ValueError, match=r"max_context 4096 exceeds the model's context 2048"):
        OrtLLMRuntime(tiny_llm_onnx.path, tiny_model.config, max_context=4096)


def test_cache_is_preallocated_and_written_in_place(tiny_llm_onnx, tiny_model):
    cfg = tiny_model.config
    rt = OrtLLMRuntime(tiny_llm_onnx.path, cfg, max_slots=3, max_context=64)
    assert rt.cache.shape == (cfg.num_layer_instances, 2, 3, cfg.num_key_value_heads, 64, cfg.head_dim)
    buffer, pointer = rt.cache, rt.cache.ctypes.data
    a, b = rt.acquire(), rt.acquire()
    rt.prefill(a, rows(5, 1))
    rt.prefill(b, rows(11, 2))
    before = rt.cache[:, :, a].copy()
    rt.decode([b], rows(1, 3))  # a step of slot b leaves slot a untouched
    assert (rt.cache[:, :, a] == before).all()
    for i in range(4):
        rt.decode([a, b], rows(2, 4 + i))
    assert rt.cache is buffer and rt.cache.ctypes.data == pointer
    assert [rt.length(a), rt.length(b)] == [9, 16]
    assert not rt.cache[:, :, a, :, 9:].any() and not rt.cache[:, :, 2].any()  # only live positions written


@torch.no_grad()
@pytest.mark.slow
def test_matches_torch_runtime_on_leading_slots(tiny_llm_onnx, tiny_model):
    """Slots 0..B-1 in order (the torch runtime's no-copy path) with different lengths."""
    ort_rt = OrtLLMRuntime(tiny_llm_onnx.path, tiny_model.config, max_slots=4, max_context=64)
    ref_rt = TorchLLMRuntime(tiny_model, max_slots=4, max_context=64)
    for rt in (ort_rt, ref_rt):
        for n, slot in zip((3, 8, 6, 12), (rt.acquire() for _ in range(4)), strict=True):
            rt.prefill(slot, rows(n, slot))
    for step in range(3):
        new = rows(4, 20 + step)
        got, want = ort_rt.decode([0, 1, 2, 3], new), ref_rt.decode([0, 1, 2, 3], new)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_graph_of_another_model_is_refused(tiny_llm_onnx):
    other = tiny_config(num_shared_layers=3, num_hidden_layers=5)
    with pytest.raises(ValueError, match=r"past_kv has \(layers, kv_heads, head_dim\) = \(6, 2, 16\).*\(7, 2, 16\)"):
        OrtLLMRuntime(tiny_llm_onnx.path, other)


@torch.no_grad()
def test_fp16_graph_runtime(tiny_llm_onnx_fp16, tiny_model):
    rt = OrtLLMRuntime(tiny_llm_onnx_fp16.path, tiny_model.config, max_slots=2, max_context=32)
    assert rt.cache.dtype.name == "float16"
    slot = rt.acquire()
    seq = rows(7, 1)
    text, audio = rt.prefill(slot, seq)
    for i in range(2):
        new = rows(1, 5 + i)
        seq = torch.cat([seq, new])
        text, audio = rt.decode([slot], new)
    ref_t, ref_a = tiny_model(seq[None], last_only=True)
    assert text.dtype == torch.float32
    torch.testing.assert_close(text[0], ref_t[0], atol=0.1, rtol=0)  # fp16 tolerance, see the export tests
    torch.testing.assert_close(audio[0], ref_a[0], atol=0.1, rtol=0)
