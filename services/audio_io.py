"""Client audio in and out, on top of `contract.audio.load_audio` (one torch-free decoder for the whole project).

In: WAV/FLAC/OGG files or raw PCM16 / float32 at any rate and channel count → float32 mono 16 kHz.
Out: float32 PCM → little-endian int16 bytes.
Every failure is an `AudioError` (`kind`, `is_resource_limit`) whose message names the limit or the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moss_speech.contract.audio import INPUT_RATE, AudioError, AudioLimits, load_audio

MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8
RAW_DTYPES = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
CONTAINER_BYTES_PER_SECOND = 192000 * 2 * 4  # bound for buffering a streamed file: 192 kHz stereo float32

__all__ = ["AudioError", "AudioSpec", "InputAudioBuffer", "decode", "to_pcm16"]


@dataclass(frozen=True)
class AudioSpec:
    """How input bytes are encoded: `container` (rate/channels from the header), `pcm16` or `float32`."""

    encoding: str = "container"
    sample_rate: int = 0
    channels: int = 1

    def check(self) -> None:
        if self.encoding == "container":
            return
        if self.encoding not in RAW_DTYPES:
            raise AudioError("bad_format", f"unknown audio encoding {self.encoding!r}")
        if not MIN_RATE <= self.sample_rate <= MAX_RATE:
            raise AudioError("bad_format", f"sample_rate {self.sample_rate} Hz is outside "
                                           f"[{MIN_RATE}, {MAX_RATE}] (raw audio needs its rate)")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise AudioError("bad_format", f"channels {self.channels} is outside [1, {MAX_CHANNELS}]")

    def max_bytes(self, max_seconds: float) -> int:
        """Most input bytes `max_seconds` of audio can take in this encoding."""
        if self.encoding == "container":
            return int(max_seconds * CONTAINER_BYTES_PER_SECOND) + 65536
        return int(max_seconds * self.sample_rate) * self.channels * RAW_DTYPES[self.encoding].itemsize


def decode(data: bytes, spec: AudioSpec, max_seconds: float) -> np.ndarray:
    """Input bytes → float32 mono 16 kHz. Raises AudioError (too_long names MOSS_SPEECH_MAX_AUDIO_SECONDS)."""
    spec.check()
    limits = AudioLimits(max_seconds=max_seconds, max_bytes=spec.max_bytes(max_seconds))
    try:
        if spec.encoding == "container":
            if not data:
                raise AudioError("empty", "audio is empty")
            pcm = load_audio(bytes(data), None, INPUT_RATE, limits)
            return pcm
        dtype = RAW_DTYPES[spec.encoding]
        frame = dtype.itemsize * spec.channels
        if len(data) % frame:
            raise AudioError("bad_format", f"{len(data)} bytes is not a whole number of {spec.encoding} frames "
                                           f"({frame} bytes for {spec.channels} channel(s))")
        samples = np.frombuffer(data, dtype=dtype).reshape(-1, spec.channels)
        return load_audio(samples, spec.sample_rate, INPUT_RATE, limits)
    except AudioError as e:
        if e.is_resource_limit:
            raise AudioError(e.kind, f"{e} (limit max_audio_seconds={max_seconds:g}, "
                                     "env MOSS_SPEECH_MAX_AUDIO_SECONDS)") from None
        raise


class InputAudioBuffer:
    """Collects streamed audio pieces of one turn; refuses to grow past what max_seconds can need."""

    def __init__(self, spec: AudioSpec, max_seconds: float) -> None:
        spec.check()
        self.spec, self.max_seconds = spec, max_seconds
        self._limit = spec.max_bytes(max_seconds)
        self._parts: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self._limit:
            raise AudioError("too_long", f"streamed audio exceeds {self.max_seconds:g} s ({self.size} bytes so far) "
                                         f"(limit max_audio_seconds={self.max_seconds:g}, "
                                         "env MOSS_SPEECH_MAX_AUDIO_SECONDS)")
        self._parts.append(piece)

    def decode(self) -> np.ndarray:
        data, self._parts, self.size = b"".join(self._parts), [], 0
        return decode(data, self.spec, self.max_seconds)


def to_pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] → little-endian int16 bytes (clipped)."""
    return (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
