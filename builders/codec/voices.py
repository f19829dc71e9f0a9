"""Voices: a prompt recording -> (prompt codes, prompt mel, x-vector), computed once and cached by voice
id."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moss_speech.builders.codec.config import DEFAULT_VOICE_ID

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class UnknownVoiceError(KeyError):
    def __init__(self, voice_id: str, known: list[str]):
        super().__init__(voice_id)
        self.voice_id = voice_id
        self.known = known

    def __str__(self) -> str:
        return f"unknown voice {self.voice_id!r}; known voices: {', '.join(self.known) or '(none)'}"


@dataclass(frozen=True)
class Voice:
    voice_id: str
    prompt_codes: np.ndarray  # int64 [P]
    prompt_mel: np.ndarray  # float32 [80, token_mel_ratio * P], 24 kHz natural-log mel
    xvector: np.ndarray  # float32 [192]


class VoiceRegistry:
    """Voice ids map to audio files in `directory` (file stem = id); each voice is computed on first use."""

    def __init__(self, build: Callable[[str, Path], Voice], directory: Path | None = None):
        self._build = build
        self._files: dict[str, Path] = {}
        self._cache: dict[str, Voice] = {}
        self._lock = threading.Lock()
        if directory is not None and directory.is_dir():
            for path in sorted(directory.iterdir()):
                if path.suffix.lower() in AUDIO_SUFFIXES:
                    self._files[path.stem] = path

    @property
    def ids(self) -> list[str]:
        return sorted(set(self._files) | set(self._cache))

    def add(self, voice: Voice) -> None:
        with self._lock:
            self._cache[voice.voice_id] = voice

    def get(self, voice_id: str = DEFAULT_VOICE_ID) -> Voice:
        voice = self._cache.get(voice_id)
        if voice is not None:
            return voice
        if voice_id not in self._files:
            raise UnknownVoiceError(voice_id, self.ids)
        with self._lock:
            if voice_id not in self._cache:
                self._cache[voice_id] = self._build(voice_id, self._files[voice_id])
            return self._cache[voice_id]

    def preload(self) -> None:
        for voice_id in list(self._files):
            self.get(voice_id)
