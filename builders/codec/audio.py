"""Audio input and spectral frontends.

Input: any of WAV/FLAC/OGG bytes, a path, or an array (int16 or float, mono or [samples, channels]) with its
rate. Everything is turned into float32 mono in [-1, 1] and resampled with soxr. Bad input raises
`AudioError`, which carries `kind` so the gRPC service can map it (INVALID_ARGUMENT vs RESOURCE_EXHAUSTED).

The spectral frontends are torch modules that export to ONNX: the STFT is a conv1d with a windowed DFT basis
(no complex tensors), the mel filterbanks are constant matrices.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.config import PreprocessorConfig, PromptMelConfig
from moss_speech.contract.audio import AudioError

# The input decoder (`load_audio`, `AudioError`) is torch-free and lives in the contract (the service uses it too).
AudioInput = bytes | str | Path | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# filterbanks
# ------------------------------------------------------------------------------------------------------------
def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3))


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters [n_mels, n_fft//2+1] (librosa's default)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz)
    ramps = hz[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2 : n_mels + 2] - hz[:n_mels]))[:, None]
    return weights.astype(np.float32)


def dft_basis(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """Conv1d weight [2 * (n_fft//2+1), 1, n_fft]: windowed cos rows then -sin rows (real, imag of the
    DFT)."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * k * n / n_fft
    w = window.to(torch.float64)[None, :]
    return torch.cat([torch.cos(ang) * w, -torch.sin(ang) * w]).float().unsqueeze(1)


class ConvSTFT(nn.Module):
    """|STFT| pieces via conv1d: returns (real, imag) [B, n_fft//2+1, frames]. Input [B, samples]."""

    def __init__(self, n_fft: int, hop: int, window: torch.Tensor, center: bool, pad_mode: str = "reflect"):
        super().__init__()
        self.n_fft, self.hop, self.center, self.pad_mode = n_fft, hop, center, pad_mode
        self.register_buffer("basis", dft_basis(n_fft, window), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)
        if self.center:
            x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode=self.pad_mode)
        spec = F.conv1d(x, self.basis, stride=self.hop)
        half = self.n_fft // 2 + 1
        return spec[:, :half], spec[:, half:]


class WhisperMel(nn.Module):
    """Whisper log-mel: PCM [B, samples] at 16 kHz -> [B, 128, samples // hop] (last STFT frame dropped)."""

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.stft = ConvSTFT(cfg.n_fft, cfg.hop_length, torch.hann_window(cfg.n_fft), center=True)
        fb = slaney_mel_filters(cfg.sampling_rate, cfg.n_fft, cfg.feature_size, 0.0, cfg.sampling_rate / 2)
        self.register_buffer("filters", torch.from_numpy(fb), persistent=False)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        re, im = self.stft(pcm)
        power = (re * re + im * im)[..., :-1]
        mel = torch.matmul(self.filters, power)
        log = torch.log10(torch.clamp(mel, min=1e-10))
        # utterance-global floor, as Whisper does (the only non-causal step of the frontend)
        peak = log.amax(dim=(1, 2), keepdim=True)
        log = torch.maximum(log, peak - 8.0)
        return (log + 4.0) / 4.0


class PromptMel(nn.Module):
    """CosyVoice/Matcha mel of the 24 kHz voice prompt: PCM [B, samples] -> natural-log mel [B, 80,
    frames]."""

    def __init__(self, cfg: PromptMelConfig):
        super().__init__()
        self.pad = (cfg.n_fft - cfg.hop_size) // 2
        self.stft = ConvSTFT(cfg.n_fft, cfg.hop_size, torch.hann_window(cfg.win_size), center=False)
        fb = slaney_mel_filters(cfg.sampling_rate, cfg.n_fft, cfg.num_mels, cfg.fmin, cfg.fmax)
        self.register_buffer("filters", torch.from_numpy(fb), persistent=False)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        x = F.pad(pcm.unsqueeze(1), (self.pad, self.pad), mode="reflect").squeeze(1)
        re, im = self.stft(x)
        mag = torch.sqrt(re * re + im * im + 1e-9)
        return torch.log(torch.clamp(torch.matmul(self.filters, mag), min=1e-5))


def kaldi_fbank(pcm: np.ndarray, sample_rate: int = 16000, n_mels: int = 80) -> np.ndarray:
    """Kaldi fbank as torchaudio.compliance.kaldi.fbank with its defaults and dither 0: [frames, n_mels].

    25 ms povey window, 10 ms shift, snip edges, DC removal, pre-emphasis 0.97, 512-point power spectrum,
    HTK-mel triangles from 20 Hz to Nyquist, natural log (floored at float eps). Runs once per voice.
    """
    x = np.asarray(pcm, dtype=np.float64)
    flen, shift, nfft = int(0.025 * sample_rate), int(0.010 * sample_rate), 512
    if x.shape[0] < flen:
        raise AudioError("empty", f"voice prompt shorter than one {flen}-sample fbank frame")
    n = 1 + (x.shape[0] - flen) // shift
    idx = np.arange(flen)[None, :] + shift * np.arange(n)[:, None]
    frames = x[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(flen) / (flen - 1))) ** 0.85
    spec = np.abs(np.fft.rfft(frames * povey, n=nfft)) ** 2  # [n, 257]

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(sample_rate / 2)
    centers = lo + (hi - lo) / (n_mels + 1) * np.arange(n_mels + 2)
    bin_mel = mel(sample_rate / nfft * np.arange(nfft // 2))
    left, center, right = centers[:-2, None], centers[1:-1, None], centers[2:, None]
    up = (bin_mel[None, :] - left) / (center - left)
    down = (right - bin_mel[None, :]) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist bin gets no weight
    energies = spec @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)
