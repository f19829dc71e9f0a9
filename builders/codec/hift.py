"""HiFT vocoder (CosyVoice2 `HiFTGenerator`, 24 kHz): mel [B, 80, T] -> PCM [B, 480 T].

F0 predictor -> harmonic sine source (NSF) -> source STFT fused at every upsampling level -> Snake ResBlocks
-> magnitude/phase -> iSTFT. STFT and iSTFT are conv1d / conv_transpose1d with DFT bases, so the whole network
exports to ONNX. The source noise is an input (`noise` [B, harmonics+1, 480 T]) so the graph has no
randomness; `source_noise` draws it per absolute token position.

Checkpoint: hift.pt is loaded strictly; weight norm is folded from either storage style.
Known difference to the reference: the harmonic phase is integrated from the first frame of the decoded window
(the reference carries it across chunks in a per-request cache). The random initial phases of the reference
never reach the output (the linear down-sampling by 480 skips sample 0), so no phase offset is drawn here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.audio import dft_basis
from moss_speech.builders.codec.config import FLOW_DIR, HIFT_WEIGHTS_NAME, HiftConfig
from moss_speech.builders.codec.weights import fold_weight_norm, load_into, read_torch_state


class Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + torch.sin(x * a).pow(2) / (a + 1e-9)


class ResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(ch, ch, k, dilation=d, padding=(k * d - d) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(ch, ch, k, padding=(k - 1) // 2) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(ch) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(ch) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        for i in range(5):
            layers[str(2 * i)] = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)
        self.condnet = nn.ModuleDict(layers)  # Sequential(conv, ELU, ...) indices 0, 2, 4, 6, 8
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = mel
        for conv in self.condnet.values():
            x = F.elu(conv(x))
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))  # [B, T] Hz


class SourceModule(nn.Module):
    """Harmonic-plus-noise source (SourceModuleHnNSF2): f0 per frame -> excitation [B, 1, T * hop]."""

    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)
        self.register_buffer("harmonics", torch.arange(1, cfg.nb_harmonics + 2, dtype=torch.float32), persistent=False)

    def forward(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cfg, up = self.cfg, self.cfg.samples_per_frame
        rad = torch.remainder(f0.unsqueeze(1) * self.harmonics[None, :, None] / cfg.sampling_rate, 1.0)
        phase = torch.cumsum(rad, dim=2) * (2 * math.pi)  # frame-rate phase, as the reference's down-sampled cumsum
        phase = F.interpolate(phase * up, scale_factor=float(up), mode="linear", align_corners=False)
        sines = torch.sin(phase) * cfg.nsf_alpha  # [B, H, T * up]
        uv = F.interpolate(f0.unsqueeze(1), scale_factor=float(up), mode="nearest") > cfg.nsf_voiced_threshold
        uv = uv.to(sines.dtype)
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        sines = sines * uv + amp * noise
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        c, n_fft = cfg.base_channels, cfg.n_fft
        self.m_source = SourceModule(cfg)
        self.f0_predictor = ConvRNNF0Predictor(
            cfg.in_channels, cfg.f0_predictor.cond_channels, cfg.f0_predictor.num_class
        )
        self.conv_pre = nn.Conv1d(cfg.in_channels, c, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c // 2**i, c // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        down_rates = [1] + cfg.upsample_rates[::-1][:-1]
        cum = [math.prod(down_rates[: i + 1]) for i in range(len(down_rates))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True)
        ):
            ch = c // 2 ** (i + 1)
            conv = nn.Conv1d(n_fft + 2, ch, 1) if u == 1 else nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2)
            self.source_downs.append(conv)
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(c // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = nn.Conv1d(c // 2 ** len(self.ups), n_fft + 2, 7, padding=3)
        window = torch.hann_window(n_fft)  # scipy get_window("hann", fftbins=True) is the periodic window
        self.register_buffer("stft_basis", dft_basis(n_fft, window), persistent=False)
        self.register_buffer("istft_basis", _inverse_basis(n_fft, window), persistent=False)
        self.register_buffer("window_sq", (window * window).view(1, 1, -1), persistent=False)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n = self.cfg.n_fft
        x = F.pad(x, (n // 2, n // 2), mode="reflect")
        return F.conv1d(x, self.stft_basis, stride=self.cfg.hop_len)  # [B, n_fft + 2, frames]: real, imag

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n, hop = self.cfg.n_fft, self.cfg.hop_len
        magnitude = torch.clamp(magnitude, max=1e2)
        spec = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        y = F.conv_transpose1d(spec, self.istft_basis, stride=hop)
        env = F.conv_transpose1d(torch.ones_like(spec[:, :1]), self.window_sq, stride=hop)
        y = y / torch.where(env > 1e-11, env, torch.ones_like(env))
        return y[:, 0, n // 2 : y.shape[-1] - n // 2]

    def forward(self, mel: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T], noise [B, harmonics+1, T * 480] (standard normal) -> PCM [B, T * 480]."""
        cfg = self.cfg
        f0 = self.f0_predictor(mel)
        s = self.m_source(f0, noise)
        s_stft = self._stft(s)
        x = self.conv_pre(mel)
        nk = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as the reference
        half = cfg.n_fft // 2 + 1
        pcm = self._istft(torch.exp(x[:, :half]), torch.sin(x[:, half:]))
        return torch.clamp(pcm, -cfg.audio_limit, cfg.audio_limit)

    @classmethod
    def from_dir(cls, codec_dir: Path, cfg: HiftConfig) -> HiFTGenerator:
        state = read_torch_state(codec_dir / FLOW_DIR / HIFT_WEIGHTS_NAME)
        state = {k.removeprefix("generator."): v for k, v in state.items()}
        model = cls(cfg)
        load_into(model, fold_weight_norm(state), f"{FLOW_DIR}/{HIFT_WEIGHTS_NAME}")
        return model.eval()


def _inverse_basis(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """conv_transpose1d weight [n_fft + 2, 1, n_fft]: one-sided inverse DFT times the synthesis window."""
    half = n_fft // 2 + 1
    k = torch.arange(half, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * k * n / n_fft
    scale = torch.full((half, 1), 2.0, dtype=torch.float64)
    scale[0] = scale[-1] = 1.0  # DC and Nyquist appear once
    w = window.to(torch.float64)[None, :]
    real = scale * torch.cos(ang) * w / n_fft
    imag = -scale * torch.sin(ang) * w / n_fft
    imag[0] = imag[-1] = 0.0  # imaginary parts of DC and Nyquist are ignored by irfft
    return torch.cat([real, imag]).float().unsqueeze(1)


def source_noise(first_token: int, n_tokens: int, channels: int, samples_per_token: int) -> torch.Tensor:
    """Standard-normal source noise [1, channels, n_tokens * samples_per_token], seeded by absolute token
    index so
    that any process decoding any window draws the same noise for the same position."""
    parts = []
    for pos in range(first_token, first_token + n_tokens):
        g = torch.Generator().manual_seed(1_000_003 * (pos + 1))
        parts.append(torch.randn(channels, samples_per_token, generator=g))
    return torch.cat(parts, dim=1).unsqueeze(0) if parts else torch.zeros(1, channels, 0)
