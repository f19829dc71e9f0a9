"""Client audio in and out, on top of `contract.audio.load_audio` (one torch-free decoder for the whole project).

In: WAV/FLAC/OGG files or raw PCM16 / float32 at any rate and channel count → float32 mono 16 kHz.
Out: float32 PCM → little-endian int16 bytes.
Every failure is an `AudioError` (`kind`, `is_resource_limit`) whose message names the limit or the problem.
Files get the same rate and channel checks as raw audio, from their header, before anything is decoded (a header
claiming 2^31 Hz would otherwise make the resampler work for seconds); audio that resamples to less than one
speech token (80 ms at 16 kHz) is refused. Decoding is CPU work: the server runs `decode` off its event loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from moss_speech.contract.audio import INPUT_RATE, AudioError, AudioLimits, load_audio

MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8
RAW_DTYPES = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
CONTAINER_BYTES_PER_SECOND = 192000 * 2 * 4  # bound for buffering a streamed file: 192 kHz stereo float32
MIN_SAMPLES = INPUT_RATE * 2 // 25  # 80 ms at 16 kHz: one speech token (12.5 Hz); less encodes to nothing

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
        check_rate_channels(self.sample_rate, self.channels, "raw audio needs its rate")

    def max_bytes(self, max_seconds: float) -> int:
        """Most input bytes `max_seconds` of audio can take in this encoding."""
        if self.encoding == "container":
            return int(max_seconds * CONTAINER_BYTES_PER_SECOND) + 65536
        return int(max_seconds * self.sample_rate) * self.channels * RAW_DTYPES[self.encoding].itemsize


def check_rate_channels(rate: int, channels: int, hint: str = "") -> None:
    """The same bounds for raw audio (from the request) and files (from their header)."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(
            "bad_format", f"sample_rate {rate} Hz is outside [{MIN_RATE}, {MAX_RATE}]" + (f" ({hint})" if hint else "")
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError("bad_format", f"channels {channels} is outside [1, {MAX_CHANNELS}]")


def _check_header(data: bytes, max_seconds: float) -> None:
    """Rate, channels and duration of a file from its header, before decoding it."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - soundfile raises several types; their messages name internal objects
        raise AudioError("undecodable", "cannot decode audio: not a WAV, FLAC or OGG file this server reads") from None
    check_rate_channels(int(info.samplerate), int(info.channels), "from the file's header")
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioError("too_long", f"audio is {info.frames / info.samplerate:.1f} s, limit is {max_seconds:g} s")


def decode(data: bytes, spec: AudioSpec, max_seconds: float) -> np.ndarray:
    """Input bytes → float32 mono 16 kHz. Raises AudioError (too_long names MOSS_SPEECH_MAX_AUDIO_SECONDS)."""
    spec.check()
    limits = AudioLimits(max_seconds=max_seconds, max_bytes=spec.max_bytes(max_seconds))
    try:
        if spec.encoding == "container":
            if not data:
                raise AudioError("empty", "audio is empty")
            if len(data) > limits.max_bytes:
                raise AudioError("too_long", f"audio file is {len(data)} bytes, limit is {limits.max_bytes}")
            _check_header(bytes(data), max_seconds)
            try:
                pcm = load_audio(bytes(data), None, INPUT_RATE, limits)
            except AudioError as e:
                if e.kind == "undecodable":  # soundfile's message names a heap object: say it plainly
                    raise AudioError("undecodable", "cannot decode audio: the file is damaged or truncated") from None
                raise
        else:
            dtype = RAW_DTYPES[spec.encoding]
            frame = dtype.itemsize * spec.channels
            if len(data) % frame:
                raise AudioError(
                    "bad_format",
                    f"{len(data)} bytes is not a whole number of {spec.encoding} "
                    f"frames ({frame} bytes for {spec.channels} channel(s))",
                )
            samples = np.frombuffer(data, dtype=dtype).reshape(-1, spec.channels)
            pcm = load_audio(samples, spec.sample_rate, INPUT_RATE, limits)
        if pcm.size < MIN_SAMPLES:
            raise AudioError(
                "empty",
                f"audio is {1000 * pcm.size / INPUT_RATE:.0f} ms long; the shortest turn is "
                f"{1000 * MIN_SAMPLES // INPUT_RATE} ms",
            )
        return pcm
    except AudioError as e:
        if e.is_resource_limit:
            raise AudioError(
                e.kind, f"{e} (limit max_audio_seconds={max_seconds:g}, env MOSS_SPEECH_MAX_AUDIO_SECONDS)"
            ) from None
        raise


class InputAudioBuffer:
    """Collects streamed audio pieces of one turn; refuses to grow past what max_seconds can need."""

    def __init__(self, spec: AudioSpec, max_seconds: float, max_bytes: int | None = None) -> None:
        spec.check()
        self.spec, self.max_seconds = spec, max_seconds
        self._limit = spec.max_bytes(max_seconds)
        if max_bytes is not None and max_bytes < self._limit:
            self._limit = max_bytes
        self._parts: list[bytes] = []
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self._limit:
            raise AudioError(
                "too_long",
                f"streamed audio of this turn exceeds {self._limit} bytes "
                f"(max_audio_seconds={self.max_seconds:g}, max_audio_buffer_bytes)",
            )
        self._parts.append(piece)

    def take(self) -> bytes:
        """The turn's bytes; the buffer is empty afterwards."""
        data, self._parts, self.size = b"".join(self._parts), [], 0
        return data

    def decode(self) -> np.ndarray:
        return decode(self.take(), self.spec, self.max_seconds)


def to_pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] → little-endian int16 bytes (clipped)."""
    return (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
