"""Whisper-VQ speech encoder (MOSS variant of the GLM-4-Voice tokenizer): log-mel -> 12.5 Hz codes.

Causal everywhere: left-padded convolutions, triangular attention masks, zero right padding before pooling.
Only the first `quantize_position` layers are built; extra layers (and `layer_norm`) in the checkpoint are
ignored, as is `embed_positions2` (it is added after quantisation and cannot change the codes). Key names
follow the checkpoint with the `encoder.` prefix stripped.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from moss_speech.builders.codec.config import ENCODER_WEIGHTS_NAME, EncoderConfig
from moss_speech.builders.codec.weights import CheckpointError, load_into

PREFIX = "encoder."


class CausalConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.dilation[0] * (self.kernel_size[0] - 1), 0)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = Attention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperVQEncoder(nn.Module):
    """mel [B, num_mel_bins, T] -> codes [B, ceil(T / frames_per_code)] (int64)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = CausalConv1d(cfg.num_mel_bins, d, kernel_size=3)
        self.conv2 = CausalConv1d(d, d, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.quantize_position))
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, d)

    def hidden(self, mel: torch.Tensor) -> torch.Tensor:
        """Pre-quantiser hidden states [B, codes, d_model]."""
        mel = F.pad(mel, (0, mel.shape[-1] % 2))  # odd length: one zero frame on the right
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        k = self.cfg.pooling_kernel_size
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 == self.cfg.pooling_position:
                x = F.pad(x.transpose(1, 2), (0, (-x.shape[1]) % k))  # zeros enter the average
                x = F.avg_pool1d(x, k, k).transpose(1, 2)
        return x

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.hidden(mel)
        c = self.codebook.weight
        flat = h.reshape(-1, h.shape[-1])
        # Same float ops as the reference (|c|^2 + |h|^2 - 2 h.c via addmm): |h|^2 cannot change the
        # exact argmin, but it sets the rounding, and near-ties must resolve as the reference resolves them.
        # argmin returns the lowest index on ties.
        dist = torch.addmm(
            torch.sum(c**2, dim=1) + torch.sum(flat**2, dim=1, keepdim=True), flat, c.t(), beta=1.0, alpha=-2.0
        )
        return torch.argmin(dist, dim=-1).reshape(h.shape[:-1])

    @classmethod
    def from_dir(cls, codec_dir: Path, cfg: EncoderConfig | None = None) -> WhisperVQEncoder:
        cfg = cfg or EncoderConfig.from_dir(codec_dir)
        path = codec_dir / ENCODER_WEIGHTS_NAME
        try:
            raw = load_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{ENCODER_WEIGHTS_NAME}: file not found in {codec_dir}") from None
        except Exception as e:
            raise CheckpointError(f"{ENCODER_WEIGHTS_NAME}: cannot read safetensors ({e})") from None
        model = cls(cfg)
        state = {k[len(PREFIX) :]: v for k, v in raw.items() if k.startswith(PREFIX)}
        load_into(model, ignored_encoder_keys(state, cfg), ENCODER_WEIGHTS_NAME)
        return model.eval()


def ignored_encoder_keys(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Drop what the quantizer-only encoder never reads: layers at/after quantize_position, the final
    layer_norm,
    embed_positions2 and EMA codebook statistics. Everything else must match exactly."""
    keep = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= cfg.quantize_position:
            continue
        if parts[0] in ("layer_norm", "embed_positions2", "ema_count", "ema_weight"):
            continue
        keep[k] = v
    return keep


def code_count(num_samples_16k: int, samples_per_code: int = 1280) -> int:
    return math.ceil(num_samples_16k / samples_per_code)
