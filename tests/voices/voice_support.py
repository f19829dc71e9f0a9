"""espeak-ng recordings for the voice tests (made in the test, nothing downloaded)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet green forest "
    "before the sun goes down."
)


def espeak(path: Path, voice: str = "en+f3", text: str = SENTENCE, speed: int = 150) -> Path:
    """A WAV recording (22.05 kHz mono int16) of `text` spoken by espeak-ng's `voice`."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return path


def read(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), rate
