"""The MOSS-Speech split LLM in plain PyTorch: the reference runtime every other runtime is compared to.

A Qwen3 trunk (`shared_block`, no final norm) feeds two parallel Qwen3 tails (`text_block`, `audio_block`),
each with its own final norm and head. Both tails run at every step. Module names match the checkpoint keys
(`model.shared_block.layers.0.self_attn.q_proj.weight`, `text_lm_head.weight`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.kv import ConcatKVCache, SlotView, StackedKVCache, StaticKVCache

KVCache = ConcatKVCache | StaticKVCache | SlotView | StackedKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF Qwen3: normalise in fp32, cast back to the input dtype, then scale.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, T, head_dim] for the given positions; inverse frequencies in fp32 as the reference."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # x [B, H, T, D]


class Attention(nn.Module):
    def __init__(self, cfg: MossSpeechConfig, cache_index: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cache_index = cache_index  # position of this layer instance in the KV cache (shared, text, audio)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.cache_index, k, v)
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: MossSpeechConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MossSpeechConfig, cache_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cache_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Block(nn.Module):
    """A stack of decoder layers whose KV cache entries start at `first_cache_index`."""

    def __init__(self, cfg: MossSpeechConfig, n_layers: int, first_cache_index: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, first_cache_index + i) for i in range(n_layers))

    def forward(self, x, cos, sin, mask, cache):
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return x


class MossSpeechModel(nn.Module):
    def __init__(self, cfg: MossSpeechConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.audio_embed = nn.Embedding(cfg.audio_vocab_size, cfg.hidden_size)
        n_shared, n_tail = cfg.num_shared_layers, cfg.num_modality_layers
        self.shared_block = Block(cfg, n_shared, 0)
        self.text_block = Block(cfg, n_tail, n_shared)
        self.audio_block = Block(cfg, n_tail, n_shared + n_tail)
        self.text_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.audio_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(
    offsets: torch.Tensor, new_tokens: int, key_len: int, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, T, S]: query t of row b sees key slot j iff j <= offsets[b] + t and the key is
    not padding. A large negative value (not -inf) keeps fully masked pad rows finite."""
    q = offsets[:, None] + torch.arange(new_tokens, device=offsets.device)  # [B, T]
    keys = torch.arange(key_len, device=offsets.device)
    allowed = keys[None, None, :] <= q[:, :, None]  # [B, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :key_len].bool()
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


class MossSpeechForCausalLM(nn.Module):
    def __init__(self, cfg: MossSpeechConfig):
        super().__init__()
        self.config = cfg
        self.model = MossSpeechModel(cfg)
        self.text_lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(cfg.hidden_size, cfg.audio_vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from moss_speech.builders.llm.checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)

    def embed(self, grid: torch.Tensor) -> torch.Tensor:
        """Row embedding is a selection, not a sum: text rows use the text table, audio rows the audio one."""
        text, audio = grid[..., 0], grid[..., 1]
        is_audio = text == self.config.modality_pad_token_id
        e_text = self.model.embed_tokens(text)
        e_audio = self.model.audio_embed(audio.clamp(0, self.config.audio_vocab_size - 1))
        return torch.where(is_audio[..., None], e_audio, e_text)

    def forward(
        self,
        grid: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [B, T, 2] (or [B, 2, T]) of (text, audio) ids -> (text_logits, audio_logits), each
        [B, T, V] or [B, V] with `last_only`. `attention_mask` [B, S] covers every key slot the step reads
        (past + new); `position_ids` default to the cache offsets."""
        if grid.shape[-1] != 2 and grid.shape[1] == 2:
            grid = grid.transpose(1, 2)
        b, t, _ = grid.shape
        x = self.embed(grid)
        offsets = (
            cache.offsets(b, grid.device) if cache is not None else torch.zeros(b, dtype=torch.long, device=grid.device)
        )
        if position_ids is None:
            position_ids = offsets[:, None] + torch.arange(t, device=grid.device)
        key_len = t + (cache.longest(b) if cache is not None and b else 0)
        mask = causal_mask(offsets, t, key_len, attention_mask, x.dtype)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)

        text_h, audio_h = self.trunk_and_tails(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(t)
        if last_only:  # the tails needed every new position (their KV cache); the heads only the last
            text_h, audio_h = text_h[:, -1], audio_h[:, -1]
        return self.text_lm_head(text_h), self.audio_lm_head(audio_h)

    def trunk_and_tails(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The split model's body, shared by `forward` and `step`: embedded rows -> normed (text, audio) states."""
        h = self.model.shared_block(x, cos, sin, mask, cache)  # no final norm: raw residual feeds both tails
        text_h = self.model.text_norm(self.model.text_block(h, cos, sin, mask, cache))
        audio_h = self.model.audio_norm(self.model.audio_block(h, cos, sin, mask, cache))
        return text_h, audio_h

    def step(
        self, grid: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, past_kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exportable step (the ONNX/TensorRT graph is exactly this; contract in builders/export/onnx_llm.py).

        grid [B, T, 2], explicit positions [B, T], mask [B, P + T] and the stacked past [L, 2, B, kv, P, D] ->
        last-position (text, audio) logits in fp32 and the K/V of the T new rows only, [L, 2, B, kv, T, D].
        Every row's new tokens sit after its P past slots; shorter rows mask their tail. The past length is
        a shape here, never a Python int read from data, so the step traces."""
        t = grid.shape[1]
        x = self.embed(grid)
        offsets = torch.zeros_like(position_ids[:, 0]) + past_kv.shape[4]
        # The additive mask stays fp32 so a half-precision step adds it in fp32 (no -inf from fp16 overflow).
        mask = causal_mask(offsets, t, attention_mask.shape[1], attention_mask, torch.float32)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        cache = StackedKVCache(past_kv)
        text_h, audio_h = self.trunk_and_tails(x, cos, sin, mask, cache)
        text = self.text_lm_head(text_h[:, -1]).float()
        audio = self.audio_lm_head(audio_h[:, -1]).float()
        return text, audio, cache.new_kv(self.config.num_layer_instances)
