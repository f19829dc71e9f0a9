"""Created voices: the limits a voice recording must meet, and the checks, torch-free.

The service runs `check_recording` before it calls the `voice` model (a clear INVALID_ARGUMENT without a Triton
round trip), and the `voice` model runs it again before it stores anything (its own guard: nothing is stored for
a recording that fails). Both see the same samples: float32 mono at the recording's own rate.

Not detected: a recording with more than one speaker. The x-vector of such a recording is an average of the
speakers and the clone sounds like neither; nothing here can tell (no diarization model ships with the codec).
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CREATED_PREFIX = "vc_"  # created voice ids; built-in ids are file stems of the codec's voices/ folder
CREATED_ID = re.compile(r"^vc_[0-9a-f]{24}$")


class VoiceLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_seconds: float = Field(3.0, gt=0, description="shortest recording")
    max_seconds: float = Field(30.0, gt=0, description="longest recording")
    frame_ms: float = Field(20.0, gt=0, description="frame length of the loudness check")
    active_dbfs: float = Field(-40.0, description="a frame at or above this RMS level counts as sound")
    min_active_seconds: float = Field(1.0, ge=0, description="sound needed, in frames above active_dbfs")
    clip_level: float = Field(0.999, gt=0, description="|sample| at or above this is full scale")
    max_clipped_fraction: float = Field(0.001, ge=0, description="most samples allowed at full scale")
    max_name_chars: int = Field(64, ge=1)
    max_description_chars: int = Field(500, ge=0)
    max_per_key: int = Field(20, ge=1, description="created voices per API key")
    # Every window re-decodes the voice prompt, so its length sets the decode cost per window; the default is the
    # built-in voices' prompt length (1.6 s = 20 tokens), so a created voice decodes as fast as the default voice.
    prompt_tokens: int = Field(20, ge=1, description="prompt tokens kept from a recording (12.5 per second)")


class VoiceRecordingError(ValueError):
    """A recording (or name) that cannot become a voice; the message names the problem and the limit."""


def is_created(voice_id: str) -> bool:
    return bool(CREATED_ID.match(voice_id))


def check_name(name: str, description: str, limits: VoiceLimits | None = None) -> None:
    limits = limits or VoiceLimits()
    if not name.strip():
        raise VoiceRecordingError("voice name is empty")
    if len(name) > limits.max_name_chars:
        raise VoiceRecordingError(f"voice name is {len(name)} characters, limit {limits.max_name_chars}")
    if any(not c.isprintable() for c in name):
        raise VoiceRecordingError("voice name contains control characters")
    if len(description) > limits.max_description_chars:
        raise VoiceRecordingError(
            f"voice description is {len(description)} characters, limit {limits.max_description_chars}"
        )


def check_recording(pcm: np.ndarray, sample_rate: int, limits: VoiceLimits | None = None) -> float:
    """Raise VoiceRecordingError when `pcm` (float32 mono at `sample_rate`) cannot be a voice; else its seconds."""
    limits = limits or VoiceLimits()
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if sample_rate <= 0:
        raise VoiceRecordingError(f"sample rate must be positive, got {sample_rate}")
    if not np.isfinite(pcm).all():
        raise VoiceRecordingError("recording contains NaN or Inf samples")
    seconds = pcm.size / sample_rate
    if seconds < limits.min_seconds:
        raise VoiceRecordingError(f"recording is too short: {seconds:.2f} s, at least {limits.min_seconds:g} s")
    if seconds > limits.max_seconds:
        raise VoiceRecordingError(f"recording is too long: {seconds:.2f} s, at most {limits.max_seconds:g} s")
    frame = max(1, int(sample_rate * limits.frame_ms / 1000))
    n = pcm.size // frame
    rms = np.sqrt(np.mean(np.square(pcm[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    active = float(np.sum(20 * np.log10(np.maximum(rms, 1e-10)) >= limits.active_dbfs)) * frame / sample_rate
    if active < limits.min_active_seconds:
        raise VoiceRecordingError(
            f"recording is silent or nearly silent: {active:.2f} s of it is at or above "
            f"{limits.active_dbfs:g} dBFS, at least {limits.min_active_seconds:g} s is needed"
        )
    clipped = float(np.mean(np.abs(pcm) >= limits.clip_level))
    if clipped > limits.max_clipped_fraction:
        raise VoiceRecordingError(
            f"recording is clipped: {100 * clipped:.2f} % of samples are at full scale, "
            f"at most {100 * limits.max_clipped_fraction:g} % allowed"
        )
    return seconds
