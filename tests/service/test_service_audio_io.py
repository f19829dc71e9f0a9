"""Input audio decoding and limits (no server)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from moss_speech.services.audio_io import AudioError, AudioSpec, InputAudioBuffer, decode, to_pcm16


def tone(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def file_bytes(x: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_files_any_rate_become_16k_mono(fmt, rate):
    out = decode(file_bytes(tone(rate, 0.5, channels=2), rate, fmt), AudioSpec(), max_seconds=10)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 8000) <= 2
    assert 0.4 < np.abs(out).max() < 0.6


@pytest.mark.parametrize("encoding", ["pcm16", "float32"])
def test_raw_pcm(encoding):
    x = tone(24000, 0.25)
    data = (x * 32767).astype("<i2").tobytes() if encoding == "pcm16" else x.astype("<f4").tobytes()
    out = decode(data, AudioSpec(encoding, 24000, 1), max_seconds=10)
    assert abs(len(out) - 4000) <= 2


@pytest.mark.parametrize(
    "data, spec, kind, words",
    [
        (b"", AudioSpec(), "empty", "empty"),
        (b"RIFF\x00\x00garbage" * 10, AudioSpec(), "undecodable", "decode"),
        (b"\x00\x00" * 100, AudioSpec("pcm16", 0, 1), "bad_format", "sample_rate"),
        (b"\x00\x00" * 100, AudioSpec("pcm16", 1_000_000, 1), "bad_format", "sample_rate"),
        (b"\x00\x00\x00", AudioSpec("pcm16", 16000, 1), "bad_format", "frames"),
        (np.array([np.nan] * 10, "<f4").tobytes(), AudioSpec("float32", 16000, 1), "non_finite", "NaN"),
        (b"\x00\x00" * 100, AudioSpec("opus", 16000, 1), "bad_format", "encoding"),
    ],
)
def test_bad_input(data, spec, kind, words):
    with pytest.raises(AudioError) as e:
        decode(data, spec, max_seconds=10)
    assert e.value.kind == kind and not e.value.is_resource_limit
    assert words in str(e.value)


def test_too_long_names_the_limit():
    with pytest.raises(AudioError) as e:
        decode(file_bytes(tone(16000, 2.0), 16000, "WAV"), AudioSpec(), max_seconds=1.0)
    assert e.value.is_resource_limit and "max_audio_seconds" in str(e.value)


def test_stream_buffer_refuses_to_grow():
    buf = InputAudioBuffer(AudioSpec("pcm16", 16000, 1), max_seconds=1.0)
    buf.add(b"\x00" * 32000)
    with pytest.raises(AudioError) as e:
        buf.add(b"\x00" * 2)
    assert e.value.is_resource_limit


def test_pcm16_out_clips():
    assert np.frombuffer(to_pcm16(np.array([2.0, -2.0, 0.0])), "<i2").tolist() == [32767, -32767, 0]
