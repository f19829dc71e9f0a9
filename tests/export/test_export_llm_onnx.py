"""The exported LLM graph against the PyTorch model: interface, prefill and decode parity (batch 2, left
padding), fp16, external data, determinism.

Tolerances: fp32 logits atol 1e-4 (observed <= 3e-5 on logits of |x| <= ~20: onnxruntime's GEMMs sum in
a different order, a few float32 ulps of the largest logits); K/V atol 5e-5 (|k| reaches ~10 after k_norm
and RoPE; observed 1.1e-5). fp16 graph vs the fp32 model: logits atol 0.1 (one fp16 ulp at |x| in [16, 32)
is 0.016; observed 0.02-0.03).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moss_speech.builders.export.onnx_llm import INPUT_NAMES, OUTPUT_NAMES, export_llm_onnx
from moss_speech.builders.llm.generate import left_pad
from moss_speech.builders.llm.kv import ConcatKVCache

LOGIT_ATOL, KV_ATOL, FP16_LOGIT_ATOL = 1e-4, 5e-5, 0.1


def rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 5000, (n,), generator=g), torch.full((n,), 512)], dim=-1)


def run(session, grid, position_ids, mask, past) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(
        session.run(
            None,
            {
                "grid": grid.numpy(),
                "position_ids": position_ids.numpy(),
                "attention_mask": mask.numpy(),
                "past_kv": past,
            },
        )
    )


def empty_past(cfg, batch: int, dtype=np.float32) -> np.ndarray:
    return np.zeros((cfg.num_layer_instances, 2, batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype)


def test_graph_interface(tiny_llm_onnx, llm_session, tiny_model):
    cfg = tiny_model.config
    L, kv, d = cfg.num_layer_instances, cfg.num_key_value_heads, cfg.head_dim
    ins = {i.name: (i.type, i.shape) for i in llm_session.get_inputs()}
    outs = {o.name: (o.type, o.shape) for o in llm_session.get_outputs()}
    assert list(ins) == INPUT_NAMES and list(outs) == OUTPUT_NAMES
    assert ins["grid"] == ("tensor(int64)", ["batch", "new_tokens", 2])
    assert ins["position_ids"] == ("tensor(int64)", ["batch", "new_tokens"])
    assert ins["attention_mask"] == ("tensor(int64)", ["batch", "total_tokens"])
    assert ins["past_kv"] == ("tensor(float)", [L, 2, "batch", kv, "past_tokens", d])
    assert outs["text_logits"] == ("tensor(float)", ["batch", cfg.vocab_size])
    assert outs["audio_logits"] == ("tensor(float)", ["batch", cfg.audio_vocab_size])
    assert outs["new_kv"] == ("tensor(float)", [L, 2, "batch", kv, "new_tokens", d])
    assert tiny_llm_onnx.data_path is None  # the tiny model's weights stay inside the .onnx file
    onnx.checker.check_model(tiny_llm_onnx.path)
    assert tiny_llm_onnx.opset == 17
    assert onnx.load(tiny_llm_onnx.path, load_external_data=False).opset_import[0].version == 17


@torch.no_grad()
@pytest.mark.slow
def test_prefill_and_decode_with_past_match_torch_batch2_left_padded(llm_session, tiny_model):
    cfg = tiny_model.config
    prompts = [rows(5, 1), rows(9, 2)]
    grid, mask = left_pad(prompts, cfg)  # row 0 has 4 pad slots on the left
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    text, audio, new_kv = run(llm_session, grid, positions, mask, empty_past(cfg, 2))
    cache = ConcatKVCache(cfg.num_layer_instances)
    ref_t, ref_a = tiny_model(grid, positions, mask, cache, last_only=True)
    np.testing.assert_allclose(text, ref_t.numpy(), atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(audio, ref_a.numpy(), atol=LOGIT_ATOL, rtol=0)
    real = mask.bool().numpy()
    for layer in range(cfg.num_layer_instances):  # K/V of real (not pad) positions
        for j in range(2):
            got = new_kv[layer, j].transpose(0, 2, 1, 3)[real]  # [tokens, kv, D]
            want = cache.layers[layer][j].numpy().transpose(0, 2, 1, 3)[real]
            np.testing.assert_allclose(got, want, atol=KV_ATOL, rtol=0)
    # Three decode steps feeding the graph's own new_kv back as past; each row against a full recompute.
    past, seqs = new_kv, list(prompts)
    for step in range(3):
        new = rows(2, 10 + step)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        text, audio, new_kv = run(llm_session, new[:, None], positions, mask, past)
        assert new_kv.shape[4] == 1
        past = np.concatenate([past, new_kv], axis=4)
        for b in range(2):
            seqs[b] = torch.cat([seqs[b], new[b : b + 1]])
            ref_t, ref_a = tiny_model(seqs[b][None], last_only=True)
            np.testing.assert_allclose(text[b], ref_t[0].numpy(), atol=LOGIT_ATOL, rtol=0)
            np.testing.assert_allclose(audio[b], ref_a[0].numpy(), atol=LOGIT_ATOL, rtol=0)


@torch.no_grad()
def test_shorter_rows_keep_left_aligned_past_with_a_masked_tail(llm_session, tiny_model):
    """The runtime layout: row 0 holds 3 tokens and 4 garbage slots after them, row 1 holds 7."""
    cfg = tiny_model.config
    a, b = rows(3, 3), rows(7, 4)
    _, _, kv_a = run(
        llm_session, a[None], torch.arange(3)[None], torch.ones(1, 3, dtype=torch.long), empty_past(cfg, 1)
    )
    _, _, kv_b = run(
        llm_session, b[None], torch.arange(7)[None], torch.ones(1, 7, dtype=torch.long), empty_past(cfg, 1)
    )
    past = np.full(kv_b.shape[:2] + (2,) + kv_b.shape[3:], 7.0, np.float32)  # finite garbage
    past[:, :, 0:1, :, :3], past[:, :, 1:2] = kv_a, kv_b
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 1], [1] * 8])
    new = rows(2, 5)
    text, audio, _ = run(llm_session, new[:, None], torch.tensor([[3], [7]]), mask, past)
    for i, seq in enumerate((a, b)):
        ref_t, ref_a = tiny_model(torch.cat([seq, new[i : i + 1]])[None], last_only=True)
        np.testing.assert_allclose(text[i], ref_t[0].numpy(), atol=LOGIT_ATOL, rtol=0)
        np.testing.assert_allclose(audio[i], ref_a[0].numpy(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_export_is_deterministic(tiny_llm_onnx, tiny_model, tmp_path):
    again = export_llm_onnx(tiny_model, tmp_path / "again.onnx")
    assert again.sha256 == tiny_llm_onnx.sha256 and again.bytes == tiny_llm_onnx.bytes


@torch.no_grad()
def test_external_data_is_one_file_beside_the_graph(tiny_dir, tiny_model, llm_session, tmp_path):
    info = export_llm_onnx(tiny_dir, tmp_path / "ext.onnx", external_data=True)  # from the checkpoint dir
    assert info.data_path == str(tmp_path / "ext.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert (tmp_path / "ext.onnx").stat().st_size < 1_000_000 < (tmp_path / "ext.onnx.data").stat().st_size
    ext = ort.InferenceSession(info.path, providers=["CPUExecutionProvider"])
    grid, cfg = rows(6, 7)[None], tiny_model.config
    args = (grid, torch.arange(6)[None], torch.ones(1, 6, dtype=torch.long), empty_past(cfg, 1))
    for got, want in zip(run(ext, *args), run(llm_session, *args), strict=True):
        np.testing.assert_array_equal(got, want)


@torch.no_grad()
def test_fp16_graph_runs_in_onnxruntime_close_to_fp32(tiny_llm_onnx_fp16, tiny_model):
    cfg = tiny_model.config
    info = tiny_llm_onnx_fp16
    assert info.dtype == "float16" and next(tiny_model.parameters()).dtype == torch.float32  # caller untouched
    sess = ort.InferenceSession(info.path, providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in sess.get_inputs()}["past_kv"] == "tensor(float16)"
    prompts = [rows(4, 8), rows(8, 9)]
    grid, mask = left_pad(prompts, cfg)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    text, audio, new_kv = run(sess, grid, positions, mask, empty_past(cfg, 2, np.float16))
    assert text.dtype == np.float32 and new_kv.dtype == np.float16
    assert np.isfinite(text).all() and np.isfinite(new_kv).all()  # left-pad rows do not overflow in fp16
    ref_t, ref_a = tiny_model(grid, positions, mask, last_only=True)
    np.testing.assert_allclose(text, ref_t.numpy(), atol=FP16_LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(audio, ref_a.numpy(), atol=FP16_LOGIT_ATOL, rtol=0)


def test_bad_dtype_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_llm_onnx(tiny_model, tmp_path / "x.onnx", dtype=torch.int8)


def test_one_implementation_of_the_step():
    """The graph is the model's own `step` (no second copy of the math in the exporter), and the LLM runtimes
    never import the exporters."""
    import inspect

    from moss_speech.builders.export import onnx_llm
    from moss_speech.model_repository.runtime import base, factory, ort_llm, torch_llm, trt_llm

    source = inspect.getsource(onnx_llm)
    assert "model.step(" in source and "shared_block" not in source and "rope_tables" not in source
    for module in (base, factory, ort_llm, torch_llm, trt_llm):
        text = inspect.getsource(module)
        assert "from moss_speech.builders.export" not in text and "import moss_speech.builders.export" not in text
