"""Fixtures for the codec export tests: test modules load them with `pytest_plugins` (tests/export/conftest.py
belongs to another area). Fixture names start with `codec_` to stay clear of other fixtures in tests/export.

The tiny codec and its ONNX export are built once per process (cached functions).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moss_speech.builders.codec import SpeechCodec
from moss_speech.builders.codec.tiny import write_tiny_codec
from moss_speech.builders.export.onnx_codec import export_codec_onnx
from moss_speech.model_repository.runtime.codec_runtime import CodecRuntime

THREADS = 1  # 2 shared cores: a second spinning thread makes torch and onnxruntime many times slower


@functools.lru_cache(maxsize=1)
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="codec_export_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=1)
def built_codec_dir() -> Path:
    out = _workdir() / "codec"
    write_tiny_codec(out, seed=0)
    return out


@functools.lru_cache(maxsize=1)
def exported() -> tuple[Path, dict]:
    out = _workdir() / "onnx"
    return out, export_codec_onnx(built_codec_dir(), out)


def speechlike(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Voiced syllables (gliding f0, two formant-like resonances, pauses) plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed) + 15 * np.sin(2 * np.pi * 5.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f1 = 500 + 300 * np.sin(2 * np.pi * 2.1 * t)
    wave = sum(np.sin(k * phase) * np.exp(-(((k * f0) - f1) ** 2) / (2 * 250.0**2)) for k in range(1, 30))
    syllables = np.clip(np.sin(2 * np.pi * 3.2 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    wave = wave * syllables + 0.003 * rng.standard_normal(t.shape)
    return (0.4 * wave / np.abs(wave).max()).astype(np.float32)


def espeak(text: str, rate: int = 16000) -> np.ndarray | None:
    """Synthesised speech via espeak-ng + sox, or None when they are not installed."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        return None
    import soundfile as sf

    wav = _workdir() / f"espeak_{abs(hash(text))}.wav"
    cmd = ["espeak-ng", "-v", "en-us", "-s", "140", "--stdout", text]
    speech = subprocess.run(cmd, capture_output=True, check=True)
    subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(rate), "-c", "1", "-b", "16", str(wav)],
        input=speech.stdout,
        check=True,
        capture_output=True,
    )
    pcm, sr = sf.read(str(wav), dtype="float32")
    assert sr == rate
    return pcm


@pytest.fixture(scope="session")
def codec_speechlike():
    """`speechlike(seconds, seed)` (a fixture, so test modules need not import this plugin module directly)."""
    return speechlike


@pytest.fixture(scope="session")
def codec_espeak():
    return espeak


@pytest.fixture(scope="module")
def codec_single_thread():
    """torch on THREADS threads for the module (restored after, other areas share the process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def codec_tiny_dir() -> Path:
    return built_codec_dir()


@pytest.fixture(scope="session")
def codec_onnx_dir(codec_tiny_dir) -> Path:
    return exported()[0]


@pytest.fixture(scope="session")
def codec_export_infos(codec_tiny_dir) -> dict:
    return exported()[1]


@pytest.fixture(scope="module")
def codec_ref(codec_tiny_dir) -> SpeechCodec:
    return SpeechCodec(codec_tiny_dir)


@pytest.fixture(scope="module")
def codec_ort_runtime(codec_tiny_dir, codec_onnx_dir) -> CodecRuntime:
    return CodecRuntime.from_artifacts(codec_tiny_dir, codec_onnx_dir, backend="onnxruntime", threads=THREADS)


@pytest.fixture(scope="module")
def codec_torch_runtime(codec_tiny_dir, codec_onnx_dir) -> CodecRuntime:
    return CodecRuntime.from_artifacts(codec_tiny_dir, codec_onnx_dir, backend="torch")
