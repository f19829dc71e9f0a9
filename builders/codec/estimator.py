"""Flow-matching velocity estimator (CosyVoice2 `CausalConditionalDecoder`): a causal 1-D U-Net.

One level (channels [C]): down resnet + transformers + causal conv, mid blocks, up resnet (skip concat) +
transformers + causal conv, final causal block, 1x1 projection. Transformer blocks are the Matcha/diffusers
`BasicTransformerBlock` (norm1, attn1.to_q/k/v/to_out.0, norm3, ff.net.0.proj / ff.net.2).

Exported as one graph: (x, mask, mu, t, spks, cond) -> velocity, all [B, 80, T] except t [B], spks [B, 80].
`chunk` (mel frames, 0 = full attention) is a construction-time constant so the graph has no branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.codec.config import EstimatorConfig
from moss_speech.builders.codec.flow_encoder import chunk_mask


class CausalConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # indices match the reference Sequential(conv, transpose, LayerNorm, transpose, Mish)
        self.block = nn.ModuleDict({"0": CausalConv1d(dim, dim_out, 3), "2": nn.LayerNorm(dim_out)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.block["0"](x * mask)
        y = self.block["2"](y.transpose(1, 2)).transpose(1, 2)
        return F.mish(y) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.ModuleDict({"1": nn.Linear(time_dim, dim_out)})  # Sequential(Mish, Linear)
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp["1"](F.mish(temb)).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](y.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleDict({"0": GELUProj(dim, dim * mult), "2": nn.Linear(dim * mult, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.in_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        ang = 1000.0 * t.float()[:, None] * freqs[None, :]  # Matcha SinusoidalPosEmb, scale 1000
        emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
        return self.linear_2(F.silu(self.linear_1(emb)))


def _stage(dim_in: int, dim: int, cfg: EstimatorConfig, time_dim: int, with_conv: bool) -> nn.ModuleList:
    parts: list[nn.Module] = [
        CausalResnetBlock1D(dim_in, dim, time_dim),
        nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks)),
    ]
    if with_conv:
        parts.append(CausalConv1d(dim, dim, 3))
    return nn.ModuleList(parts)


class CausalConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig, chunk: int = 0):
        super().__init__()
        self.cfg, self.chunk = cfg, chunk
        c = cfg.channels[0]
        time_dim = 4 * c
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)
        self.down_blocks = nn.ModuleList([_stage(cfg.in_channels, c, cfg, time_dim, True)])
        self.mid_blocks = nn.ModuleList(_stage(c, c, cfg, time_dim, False) for _ in range(cfg.num_mid_blocks))
        self.up_blocks = nn.ModuleList([_stage(2 * c, c, cfg, time_dim, True)])
        self.final_block = CausalBlock1D(c, c)
        self.final_proj = nn.Conv1d(c, cfg.out_channels, 1)

    def _attend(self, x: torch.Tensor, blocks: nn.ModuleList, bias: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        temb = self.time_mlp(t)
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
        visible = chunk_mask(x.shape[-1], self.chunk, x.device).unsqueeze(0) & mask.bool()  # [B, T, T]
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, -1e10).unsqueeze(1)

        resnet, blocks, conv = self.down_blocks[0]
        h = resnet(h, mask, temb)
        skip = h = self._attend(h, blocks, bias)
        h = conv(h * mask)
        for resnet, blocks in self.mid_blocks:
            h = self._attend(resnet(h, mask, temb), blocks, bias)
        resnet, blocks, conv = self.up_blocks[0]
        h = self._attend(resnet(torch.cat([h, skip], dim=1), mask, temb), blocks, bias)
        h = conv(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask
