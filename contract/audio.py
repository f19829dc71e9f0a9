"""Audio at the edges of the pipeline: rates, limits, and the one input decoder.

`load_audio` turns WAV/FLAC/OGG bytes, a path, or an array (int16/int32/float, mono or [samples, channels])
into float32 mono at a target rate, resampled with soxr. It is torch-free so the service decodes client uploads
with exactly the code the codec uses in process. soundfile and soxr are imported when decoding, so importing
this module needs only numpy and pydantic.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

INPUT_RATE = 16000  # the speech encoder's input (the `AUDIO` tensor)
OUTPUT_RATE = 24000  # the vocoder's output (the `AUDIO_CHUNK` tensor)
MAX_AUDIO_SECONDS = 60.0  # longest input audio of one turn: the service's and the speech encoder's default
MAX_AUDIO_BYTES = 64 * 1024 * 1024  # largest encoded file the decoder reads

AudioKind = Literal["empty", "non_finite", "too_long", "undecodable", "bad_format"]


class AudioError(ValueError):
    """Unusable audio. `kind` says which check failed; `too_long` is a resource limit, the rest are bad input."""

    def __init__(self, kind: AudioKind, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def is_resource_limit(self) -> bool:
        return self.kind == "too_long"


class AudioLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_seconds: float = Field(MAX_AUDIO_SECONDS, gt=0, description="longest accepted input audio")
    max_bytes: int = Field(MAX_AUDIO_BYTES, ge=1, description="largest accepted encoded file")
    min_samples: int = Field(1, ge=1)


def _as_array(audio: Any) -> np.ndarray:
    if hasattr(audio, "detach"):  # a torch tensor, without importing torch
        return audio.detach().cpu().numpy()
    return np.asarray(audio)


def load_audio(
    audio: bytes | str | Path | Any, sample_rate: int | None, target_rate: int, limits: AudioLimits | None = None
) -> np.ndarray:
    """Decode/convert `audio` to float32 mono at `target_rate`. `sample_rate` is required for arrays."""
    import soundfile as sf
    import soxr

    limits = limits or AudioLimits()
    if isinstance(audio, (bytes, bytearray, str, Path)):
        if isinstance(audio, (bytes, bytearray)) and len(audio) > limits.max_bytes:
            raise AudioError("too_long", f"audio file is {len(audio)} bytes, limit is {limits.max_bytes}")
        try:
            src = io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else str(audio)
            data, sample_rate = sf.read(src, dtype="float32", always_2d=True)
        except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, TypeError)
            raise AudioError("undecodable", f"cannot decode audio: {e}") from None
    else:
        if sample_rate is None or sample_rate <= 0:
            raise AudioError("bad_format", f"an array needs a positive sample rate, got {sample_rate}")
        data = _as_array(audio)
        if data.dtype == np.int16:
            data = data.astype(np.float32) / 32768.0
        elif data.dtype == np.int32:
            data = data.astype(np.float32) / 2147483648.0
        elif np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float32, copy=False)
        else:
            raise AudioError("bad_format", f"unsupported sample type {data.dtype} (use int16 or float32)")
        if data.ndim == 1:
            data = data[:, None]
        elif data.ndim == 2:
            # [samples, channels]; accept [channels, samples] when clearly so (few rows, many columns)
            if data.shape[0] <= 8 < data.shape[1]:
                data = data.T
        else:
            raise AudioError("bad_format", f"audio must be 1-D or [samples, channels], got shape {data.shape}")
    if data.shape[0] < limits.min_samples or data.size == 0:
        raise AudioError("empty", "audio is empty")
    if not np.isfinite(data).all():
        raise AudioError("non_finite", "audio contains NaN or Inf samples")
    seconds = data.shape[0] / sample_rate
    if seconds > limits.max_seconds:
        raise AudioError("too_long", f"audio is {seconds:.1f} s, limit is {limits.max_seconds:.1f} s")
    mono = data.mean(axis=1).astype(np.float32)
    if sample_rate != target_rate:
        mono = soxr.resample(mono, sample_rate, target_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono)
