"""Voices: a prompt recording -> (prompt codes, prompt mel, x-vector), computed once and cached by voice
id."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moss_speech.builders.codec.config import DEFAULT_VOICE_ID
from moss_speech.builders.codec.voice_store import VoiceStore
from moss_speech.contract.voices import is_created

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class UnknownVoiceError(KeyError):
    def __init__(self, voice_id: str, known: list[str]):
        super().__init__(voice_id)
        self.voice_id = voice_id
        self.known = known

    def __str__(self) -> str:
        return f"unknown voice {self.voice_id!r}; known voices: {', '.join(self.known) or '(none)'}"


def loudest_segment(pcm: np.ndarray, samples_per_token: int, n_tokens: int, keep: int) -> int:
    """First token of the `keep` contiguous tokens (of `n_tokens`) with the highest mean level in dB.

    The level is per token (RMS of its samples, floored at -100 dBFS), so a segment with a pause or leading
    silence scores low: the kept prompt is the stretch with the most continuous speech. Ties go to the earliest."""
    if keep >= n_tokens:
        return 0
    pcm = np.asarray(pcm, np.float64).reshape(-1)[: n_tokens * samples_per_token]
    pcm = np.pad(pcm, (0, n_tokens * samples_per_token - pcm.size))
    ms = np.mean(np.square(pcm.reshape(n_tokens, samples_per_token)), axis=1)
    level = 10 * np.log10(np.maximum(ms, 1e-10))
    sums = np.convolve(level, np.ones(keep), mode="valid")  # [n_tokens - keep + 1] window sums
    return int(np.argmax(sums))


@dataclass(frozen=True)
class Voice:
    voice_id: str
    prompt_codes: np.ndarray  # int64 [P]
    prompt_mel: np.ndarray  # float32 [80, token_mel_ratio * P], 24 kHz natural-log mel
    xvector: np.ndarray  # float32 [192]


class VoiceRegistry:
    """Voice ids map to audio files in `directory` (file stem = id); each voice is computed on first use.

    Created voices (`vc_...` ids) come from a `VoiceStore` when one is attached: a content-addressed cache per
    instance (sha256 of the stored conditioning -> Voice) filled on a miss, and one stat per lookup so a deleted
    voice is unknown at once."""

    def __init__(self, build: Callable[[str, Path], Voice], directory: Path | None = None):
        self._build = build
        self._files: dict[str, Path] = {}
        self._cache: dict[str, Voice] = {}
        self._lock = threading.Lock()
        self.store: VoiceStore | None = None
        self._by_digest: dict[str, Voice] = {}
        self._digest_of: dict[str, str] = {}  # created voice id -> digest
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

    @property
    def builtin_files(self) -> dict[str, Path]:
        return dict(self._files)

    def get(self, voice_id: str = DEFAULT_VOICE_ID) -> Voice:
        voice = self._cache.get(voice_id)
        if voice is not None:
            return voice
        if self.store is not None and is_created(voice_id):
            return self._created(voice_id)
        if voice_id not in self._files:
            raise UnknownVoiceError(voice_id, self.ids)
        with self._lock:
            if voice_id not in self._cache:
                self._cache[voice_id] = self._build(voice_id, self._files[voice_id])
            return self._cache[voice_id]

    def _created(self, voice_id: str) -> Voice:
        if not self.store.exists(voice_id):  # deleted (ids are never reused, so a hit is never stale)
            self._digest_of.pop(voice_id, None)
            raise UnknownVoiceError(voice_id, self.ids)
        digest = self._digest_of.get(voice_id)
        if digest is not None:
            return self._by_digest[digest]
        try:
            record, arrays = self.store.conditioning(voice_id)
        except KeyError:
            raise UnknownVoiceError(voice_id, self.ids) from None
        with self._lock:
            voice = self._by_digest.setdefault(
                record.digest, Voice(voice_id, arrays["prompt_codes"], arrays["prompt_mel"], arrays["xvector"])
            )
            self._digest_of[voice_id] = record.digest
        return voice

    def preload(self) -> None:
        for voice_id in list(self._files):
            self.get(voice_id)
