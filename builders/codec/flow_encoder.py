"""Flow token encoder (CosyVoice2 `UpsampleConformerEncoder`): token embeddings -> mel-rate features.

linear+LayerNorm input layer with ESPnet relative positions, a pre-lookahead conv layer, conformer layers
(relative-position attention, no macaron FFN, no conv module), nearest x`upsample_stride` + causal conv, a
second input layer, more conformer layers, final LayerNorm.

Deviation: the reference hard-codes width 512 in `pre_lookahead_layer` and `up_layer`; here they use
`output_size` (512 in the real config, smaller in the tiny codec), and the up-block count (4 in the reference)
is the config field `num_up_blocks`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.config import FlowEncoderConfig


def chunk_mask(size: int | torch.Tensor, chunk: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool: frame i sees every frame before the end of its chunk (chunk <= 0: everything)."""
    pos = torch.arange(size, device=device)
    if chunk <= 0:
        return torch.ones(pos.shape[0], pos.shape[0], dtype=torch.bool, device=device)
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk
    return pos.unsqueeze(0) < limit.unsqueeze(1)


def rel_positions(t: int | torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    """ESPnet relative sinusoids for offsets T-1 ... -(T-1): [1, 2T-1, dim] (sin on even, cos on odd
    channels)."""
    n = torch.as_tensor(t, device=device)
    rel = torch.arange(0, 2 * n - 1, device=device, dtype=torch.float32)
    rel = (n - 1).to(torch.float32) - rel
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim))
    ang = rel[:, None] * div[None, :]
    return torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(1, -1, dim)


class LinearInput(nn.Module):
    """`LinearNoSubsampling`: keys out.0 (Linear), out.1 (LayerNorm); scales by sqrt(d) like the pos
    encoder."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        return x, rel_positions(x.shape[1], x.shape[2], x.device)


class RelPositionAttention(nn.Module):
    def __init__(self, heads: int, dim: int, key_bias: bool):
        super().__init__()
        self.h, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim, bias=key_bias)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, 2T-1] scores by relative offset -> [B, H, T, T] scores by key position
        (Transformer-XL)."""
        b, h, t, n = x.shape
        x = F.pad(x, (1, 0)).view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)
        return x[..., : n // 2 + 1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, self.h, self.d_k).transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = self.rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (ac + bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.linear_out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))  # CosyVoice2 activation_type: swish


class ConformerLayer(nn.Module):
    def __init__(self, cfg: FlowEncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionAttention(cfg.attention_heads, d, cfg.key_bias)
        self.feed_forward = FeedForward(d, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, T, C]; context [B, lookahead, C]: the embedded lookahead tokens (zeros at the end of
        speech)."""
        y = torch.cat([x, context], dim=1).transpose(1, 2)
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x


class UpsampleLayer(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.repeat_interleave(x, self.stride, dim=2)  # nearest upsampling
        return self.conv(F.pad(x, (self.stride * 2, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: FlowEncoderConfig, lookahead: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.embed = LinearInput(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.up_layer = UpsampleLayer(d, cfg.upsample_stride)
        self.up_embed = LinearInput(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(
        self,
        xs: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        chunked: bool,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """xs [B, T, C] token embeddings, context [B, L, C] lookahead embeddings with mask [B, L, 1] (None: the
        end of speech, an all-zero lookahead) -> [B, T * stride, C].

        `valid` [B, T] bool marks the real tokens of right-padded rows (None: every token is real). Padded
        embeddings are zeroed, so right after a row's last token they play the same empty lookahead as the end
        of speech, and padded keys are masked in every attention; the convolutions after the pre-lookahead
        layer are causal, so each row equals its unpadded self on its own frames.
        """
        chunk = self.cfg.static_chunk_size if chunked else 0
        stride = self.cfg.upsample_stride
        x, pos = self.embed(xs)
        if context is None:
            ctx = torch.zeros_like(x[:, :1]).expand(-1, self.pre_lookahead_layer.lookahead, -1)
        else:
            ctx = self.embed.out(context) * self.embed.xscale * context_mask
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)
        mask = _attention_mask(x.shape[1], chunk, valid, x.device)
        x = self.pre_lookahead_layer(x, ctx)
        for layer in self.encoders:
            x = layer(x, mask, pos)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        x, pos = self.up_embed(x)
        if valid is not None:
            valid = torch.repeat_interleave(valid, stride, dim=1)
        mask = _attention_mask(x.shape[1], chunk * stride, valid, x.device)
        for layer in self.up_encoders:
            x = layer(x, mask, pos)
        return self.after_norm(x)


def _attention_mask(
    size: int | torch.Tensor, chunk: int, valid: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """[T, T] chunk mask, or [B, 1, T, T] with the padded keys of each row hidden as well."""
    mask = chunk_mask(size, chunk, device)
    if valid is None:
        return mask
    return (mask[None] & valid[:, None, :]).unsqueeze(1)
