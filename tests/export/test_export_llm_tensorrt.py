"""TensorRT engine builds without a GPU (TensorRT-RTX from PyPI, or datacenter TensorRT when present): the
exported tiny LLM graph parses and builds with the LLM profiles; the generic builder's profile checks,
precision rules and timing cache. Running an engine needs a GPU: see the tensorrt conformance factory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moss_speech.builders.export.tensorrt import (
    TensorRTUnavailable,
    build_engine,
    graph_float_type,
    import_tensorrt,
    llm_profiles,
)

try:
    _, BACKEND = import_tensorrt()
except TensorRTUnavailable as e:
    pytest.skip(f"no TensorRT builder importable ({e}); pip install -e '.[trt-rtx]'", allow_module_level=True)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """y = relu(x @ W), x [batch, 8] with a dynamic batch."""
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_llm_profiles_are_self_consistent(tiny_model):
    cfg = tiny_model.config
    decode, prefill = llm_profiles(cfg, max_batch=4, max_context=256)
    for prof in (decode, prefill):
        for i in range(3):  # min, opt, max: mask = past + new, batch agrees everywhere
            g, pos, m, kv = (prof[n][i] for n in ("grid", "position_ids", "attention_mask", "past_kv"))
            assert m[1] == kv[4] + g[1] and g[:2] == pos and g[0] == m[0] == kv[2]
            assert kv[:2] == (cfg.num_layer_instances, 2) and kv[3:4] + kv[5:] == (2, 16)
    assert decode["grid"][2] == (4, 1, 2) and decode["attention_mask"][2] == (4, 256)
    assert prefill["grid"][2] == (1, 256, 2) and prefill["past_kv"][2][4] == 0
    with pytest.raises(ValueError, match="4096 must be in"):
        llm_profiles(cfg, 4, 4096)


@pytest.mark.slow
def test_tiny_llm_graph_builds_into_an_engine(tiny_llm_onnx, tiny_model, tmp_path):
    info = build_engine(
        tiny_llm_onnx.path, tmp_path / "llm.plan", llm_profiles(tiny_model.config, 4, 256), precision="fp32"
    )
    assert info.backend == BACKEND and info.precision == "fp32"
    assert info.strongly_typed and info.flags == []  # fp32 graph built as fp32: no precision flag
    assert (tmp_path / "llm.plan").stat().st_size == info.bytes > 1_000_000
    assert len(info.profiles) == 2
    assert not [w for w in info.warnings if "not self-consistent" in w]


@pytest.mark.slow
def test_fp16_llm_graph_builds_as_fp16(tiny_llm_onnx_fp16, tiny_model, tmp_path):
    onnx16 = tiny_llm_onnx_fp16
    assert graph_float_type(onnx16.path) == TensorProto.FLOAT16
    info = build_engine(onnx16.path, tmp_path / "llm16.plan", llm_profiles(tiny_model.config, 2, 64), precision="fp16")
    assert info.strongly_typed and info.flags == [] and info.bytes > 1_000_000


def test_precision_rules(small_onnx, tmp_path):
    if BACKEND == "tensorrt-rtx":  # no FP16/BF16 builder flags: an fp32 graph cannot become an fp16 engine
        with pytest.raises(ValueError, match="FLOAT weights.*cannot build it as fp16"):
            build_engine(small_onnx, tmp_path / "a.plan", {"x": ((1, 8), (2, 8), (4, 8))}, precision="fp16")
    else:
        info = build_engine(small_onnx, tmp_path / "a.plan", {"x": ((1, 8), (2, 8), (4, 8))}, precision="fp16")
        assert info.flags == ["FP16"] and not info.strongly_typed
    with pytest.raises(ValueError, match="precision must be one of"):
        build_engine(small_onnx, tmp_path / "b.plan", {"x": ((1, 8), (2, 8), (4, 8))}, precision="int8")


@pytest.mark.parametrize(
    "profile, message",
    [
        ({}, "no shapes for dynamic input 'x'"),
        ({"x": ((1, 8), (2, 8), (4, 8)), "z": ((1,), (1,), (1,))}, r"names \['z'\]"),
        ({"x": ((4, 8), (2, 8), (1, 8))}, "min <= opt <= max"),
        ({"x": ((1, 9), (2, 9), (4, 9))}, "does not fit"),
    ],
)
def test_bad_profiles_are_named(small_onnx, tmp_path, profile, message):
    with pytest.raises(ValueError, match=message):
        build_engine(small_onnx, tmp_path / "x.plan", profile, precision="fp32")


def test_timing_cache_is_saved_and_reused_where_supported(small_onnx, tmp_path):
    cache = tmp_path / "cache" / "timing.bin"
    profiles = [{"x": ((1, 8), (2, 8), (4, 8))}, {"x": ((8, 8), (16, 8), (32, 8))}]
    first = build_engine(small_onnx, tmp_path / "1.plan", profiles, precision="fp32", timing_cache=cache)
    second = build_engine(small_onnx, tmp_path / "2.plan", profiles, precision="fp32", timing_cache=cache)
    assert second.bytes > 0 and len(second.profiles) == 2
    if BACKEND == "tensorrt-rtx":  # its timing cache is a no-op: nothing claimed, nothing written
        assert first.timing_cache is second.timing_cache is None and not cache.exists()
    else:
        assert first.timing_cache == second.timing_cache == str(cache) and cache.stat().st_size > 0


def test_unreadable_graph_is_named(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="bad.onnx is not a readable ONNX file"):
        build_engine(bad, tmp_path / "bad.plan", {}, precision="fp32")
