"""The tiny LLM exported once per session (fp32 and fp16, weights inside the .onnx file)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm_onnx(tiny_model, tmp_path_factory):
    from moss_speech.builders.export.onnx_llm import export_llm_onnx

    return export_llm_onnx(tiny_model, tmp_path_factory.mktemp("onnx-llm") / "llm.onnx")


@pytest.fixture(scope="session")
def tiny_llm_onnx_fp16(tiny_model, tmp_path_factory):
    from moss_speech.builders.export.onnx_llm import export_llm_onnx

    return export_llm_onnx(tiny_model, tmp_path_factory.mktemp("onnx-llm-fp16") / "llm16.onnx", dtype="float16")


@pytest.fixture(scope="session")
def llm_session(tiny_llm_onnx):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(tiny_llm_onnx.path, opts, providers=["CPUExecutionProvider"])
