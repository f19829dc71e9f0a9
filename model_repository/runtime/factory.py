"""Build the runtimes a model repository names (`ServingConfig.llm_runtime` / `codec_backend`)."""

from __future__ import annotations

from pathlib import Path

import torch

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.runtime.base import LLMRuntime

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_llm_runtime(
    serving: ServingConfig, checkpoint_dir: str | Path, artifact: str | Path | None = None, device: str = "cpu"
) -> LLMRuntime:
    """`artifact` is the ONNX graph (onnxruntime) or the engine (tensorrt); torch reads the checkpoint."""
    kind = serving.llm_runtime
    if kind == "torch":
        from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

        return TorchLLMRuntime.from_checkpoint(
            checkpoint_dir,
            dtype=DTYPES[serving.dtype],
            device=device,
            max_slots=serving.max_slots,
            max_context=serving.max_context,
        )
    config = MossSpeechConfig.from_dir(checkpoint_dir)
    if artifact is None:
        raise ValueError(f"the {kind} LLM runtime needs an artifact path")
    if kind == "onnxruntime":
        import onnxruntime as ort

        from moss_speech.model_repository.runtime.ort_llm import OrtLLMRuntime

        options = ort.SessionOptions()
        options.intra_op_num_threads = serving.cpu_threads
        return OrtLLMRuntime(
            artifact, config, max_slots=serving.max_slots, max_context=serving.max_context, session_options=options
        )
    if kind == "tensorrt":
        from moss_speech.model_repository.runtime.trt_llm import TrtLLMRuntime

        return TrtLLMRuntime(artifact, config, max_slots=serving.max_slots, max_context=serving.max_context)
    raise ValueError(f"unknown LLM runtime {kind!r}")


def load_codec_runtime(serving: ServingConfig, codec_dir: str | Path, artifacts_dir: str | Path | None = None):
    from moss_speech.model_repository.runtime.codec_runtime import CodecRuntime, TorchCodecRuntime

    if artifacts_dir is None:  # nothing exported: the PyTorch modules straight from the codec directory
        return TorchCodecRuntime(codec_dir, streaming=serving.streaming())
    extra = {"threads": serving.cpu_threads} if serving.codec_backend == "onnxruntime" else {}
    return CodecRuntime.from_artifacts(
        codec_dir, artifacts_dir, backend=serving.codec_backend, streaming=serving.streaming(), **extra
    )
