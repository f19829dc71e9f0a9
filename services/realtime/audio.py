"""Realtime audio formats: `audio/pcm` (24 kHz mono int16 LE), G.711 `audio/pcmu` (mu-law) and `audio/pcma`
(A-law) at 8 kHz, plus streaming resampling.

G.711 is computed with the ITU-T reference algorithms into lookup tables built once at import (65536 entries to
encode, 256 to decode), so a conversion is one numpy indexing operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

PCM_RATE = 24000
G711_RATE = 8000


@dataclass(frozen=True)
class Format:
    """One Realtime audio format: wire name, sample rate and bytes per sample."""

    type: str
    rate: int
    width: int  # bytes per sample on the wire

    def to_pcm16(self, data: bytes) -> np.ndarray:
        """Wire bytes -> int16 samples at `self.rate`."""
        if self.type == "audio/pcm":
            return np.frombuffer(data, dtype="<i2").astype(np.int16)
        table = _ULAW_DECODE if self.type == "audio/pcmu" else _ALAW_DECODE
        return table[np.frombuffer(data, dtype=np.uint8)]

    def from_pcm16(self, pcm: np.ndarray) -> bytes:
        """int16 samples at `self.rate` -> wire bytes."""
        pcm = np.asarray(pcm, dtype=np.int16)
        if self.type == "audio/pcm":
            return pcm.astype("<i2").tobytes()
        table = _ULAW_ENCODE if self.type == "audio/pcmu" else _ALAW_ENCODE
        return table[pcm.view(np.uint16)].tobytes()

    def ms(self, n_bytes: int) -> float:
        return 1000.0 * n_bytes / (self.width * self.rate)


FORMATS = {
    "audio/pcm": Format("audio/pcm", PCM_RATE, 2),
    "audio/pcmu": Format("audio/pcmu", G711_RATE, 1),
    "audio/pcma": Format("audio/pcma", G711_RATE, 1),
}


class Resampler:
    """Streaming int16 resampler (soxr keeps its filter state between pieces); identity when rates match.

    quality "HQ" delays its output by ~9 ms (24 -> 16 kHz); "QQ" (cubic) by under 0.1 ms: the VAD's input uses QQ,
    since every ms of delay there is endpointing delay and the VAD does not need a steep filter."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = (
            soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality) if in_rate != out_rate else None
        )

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return np.asarray(pcm, dtype=np.int16)
        x = np.asarray(pcm, dtype=np.float32) / 32768.0
        y = self._stream.resample_chunk(x, last=last)
        return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)


def resample(pcm: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """One-shot int16 resampling."""
    if in_rate == out_rate:
        return np.asarray(pcm, dtype=np.int16)
    y = soxr.resample(np.asarray(pcm, dtype=np.float32) / 32768.0, in_rate, out_rate)
    return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)


# --- G.711 (ITU-T G.711 reference algorithms) ---------------------------------------------------------------


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _ulaw_encode_table() -> np.ndarray:
    s = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32) >> 2  # 14-bit
    mask = np.where(s < 0, 0x7F, 0xFF)
    v = np.minimum(np.where(s < 0, -s, s), 8159) + (0x84 >> 2)
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), v)  # first end >= v
    uval = (np.minimum(seg, 7) << 4) | ((v >> (seg + 1)) & 0x0F)
    uval = np.where(seg >= 8, 0x7F, uval)
    return ((uval ^ mask) & 0xFF).astype(np.uint8)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


def _alaw_encode_table() -> np.ndarray:
    s = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32) >> 3  # 13-bit
    mask = np.where(s >= 0, 0xD5, 0x55)
    v = np.where(s >= 0, s, -s - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), v)  # first end >= v
    shift = np.where(seg < 2, 1, seg)
    aval = (np.minimum(seg, 7) << 4) | ((v >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)
    return ((aval ^ mask) & 0xFF).astype(np.uint8)


_ULAW_DECODE, _ULAW_ENCODE = _ulaw_decode_table(), _ulaw_encode_table()
_ALAW_DECODE, _ALAW_ENCODE = _alaw_decode_table(), _alaw_encode_table()
