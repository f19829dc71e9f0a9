"""`ServingConfig`: how a model repository serves. `moss-speech build` writes it (JSON) into every model's
config.pbtxt parameters and the adapters read it back; the chart's values follow it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moss_speech.contract.audio import MAX_AUDIO_SECONDS
from moss_speech.contract.streaming import StreamingConfig, StreamingSizes

RUNTIMES = "^(torch|onnxruntime|tensorrt)$"


class ConfigError(ValueError):
    """A configuration that cannot describe a working model or repository; the message names the field."""


class ServingConfig(StreamingSizes):
    """The streaming sizes (`StreamingSizes`) plus everything else a served repository is built with."""

    llm_runtime: str = Field("onnxruntime", pattern=RUNTIMES)
    codec_backend: str = Field("onnxruntime", pattern=RUNTIMES)
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    max_slots: int = Field(8, ge=1, le=256)  # concurrent sequences in the LLM's KV cache (= max decode batch)
    max_context: int = Field(4096, ge=16)  # tokens per sequence (prompt + answer)
    max_queue: int = Field(64, ge=0)  # requests waiting for a KV slot before UNAVAILABLE
    encoder_max_batch: int = Field(8, ge=1)
    vocoder_max_batch: int = Field(8, ge=1)
    vocoder_instances: int = Field(2, ge=1)
    queue_delay_us: int = Field(500, ge=0)  # dynamic batching delay of encoder and vocoder (latency first)
    # Ensembles' max_inflight_requests: only newer tritonservers know the field (2.51 rejects it).
    max_inflight_requests: int | None = Field(None, ge=1)
    max_audio_seconds: float = Field(MAX_AUDIO_SECONDS, gt=0)  # longest AUDIO the speech encoder accepts
    kind: str = Field("KIND_CPU", pattern="^KIND_(CPU|GPU)$")
    # Intra-op threads per model instance. Every Triton Python model is its own process: with several
    # instances on a few cores, more threads only oversubscribe (spinning OpenMP threads stall each other).
    cpu_threads: int = Field(1, ge=1)

    def streaming(self) -> StreamingConfig:
        return StreamingConfig(**self.sizes())

    @classmethod
    def for_target(cls, target: str, **overrides: Any) -> ServingConfig:
        """CPU: onnxruntime everywhere; GPU: TensorRT engines on KIND_GPU, bf16."""
        if target == "cpu":
            base: dict[str, Any] = dict(llm_runtime="onnxruntime", codec_backend="onnxruntime", kind="KIND_CPU")
        elif target == "gpu":
            base = dict(llm_runtime="tensorrt", codec_backend="tensorrt", kind="KIND_GPU", dtype="bfloat16")
        else:
            raise ConfigError(f"build target must be 'cpu' or 'gpu', got {target!r}")
        return cls(**(base | overrides))
