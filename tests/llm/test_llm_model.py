"""The split LLM: KV-cache decoding vs full recomputation, batching with left padding, heads and layout."""

from __future__ import annotations

import pytest
import torch

from moss_speech.builders.llm.generate import left_pad
from moss_speech.builders.llm.kv import ConcatKVCache, StaticKVCache

ATOL = 1e-4  # fp32, accumulated over 20+ cached steps on the tiny model


def random_grid(cfg, length: int, seed: int) -> torch.Tensor:
    """Mixed text and audio rows, as a real conversation has."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 1000, (length,), generator=g)
    audio = torch.full((length,), cfg.audio_pad_token_id)
    is_audio = torch.rand(length, generator=g) < 0.5
    text[is_audio] = cfg.modality_pad_token_id
    audio[is_audio] = torch.randint(0, cfg.eosp_token_id, (int(is_audio.sum()),), generator=g)
    return torch.stack([text, audio], dim=-1)


def test_layout_matches_the_real_key_names(tiny_model):
    cfg = tiny_model.config
    keys = set(tiny_model.state_dict())
    assert len(keys) == 2 + 11 * cfg.num_layer_instances + 2 + 2
    for key in (
        "model.embed_tokens.weight",
        "model.audio_embed.weight",
        "model.text_norm.weight",
        "model.audio_norm.weight",
        "text_lm_head.weight",
        "audio_lm_head.weight",
        "model.shared_block.layers.0.self_attn.q_norm.weight",
        "model.text_block.layers.0.mlp.gate_proj.weight",
        f"model.audio_block.layers.{cfg.num_modality_layers - 1}.post_attention_layernorm.weight",
    ):
        assert key in keys, key
    assert not any("bias" in k for k in keys)


def test_both_heads_and_grid_orientation(tiny_model):
    cfg = tiny_model.config
    grid = random_grid(cfg, 12, seed=1)[None]
    text, audio = tiny_model(grid)
    assert text.shape == (1, 12, cfg.vocab_size) and audio.shape == (1, 12, cfg.audio_vocab_size)
    text_t, audio_t = tiny_model(grid.transpose(1, 2))  # [B, 2, L] is accepted too
    torch.testing.assert_close(text_t, text)
    torch.testing.assert_close(audio_t, audio)


def test_embedding_is_a_selection_not_a_sum(tiny_model):
    cfg = tiny_model.config
    grid = torch.tensor([[[cfg.modality_pad_token_id, 7], [42, cfg.audio_pad_token_id]]])
    emb = tiny_model.embed(grid)[0]
    torch.testing.assert_close(emb[0], tiny_model.model.audio_embed.weight[7])
    torch.testing.assert_close(emb[1], tiny_model.model.embed_tokens.weight[42])


def test_tails_see_the_same_trunk(tiny_model):
    """Changing only the text tail changes text logits, never audio logits (tails are parallel)."""
    cfg = tiny_model.config
    grid = random_grid(cfg, 10, seed=2)[None]
    text0, audio0 = tiny_model(grid)
    w = tiny_model.model.text_block.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.5)
    try:
        text1, audio1 = tiny_model(grid)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not torch.allclose(text0, text1)
    torch.testing.assert_close(audio0, audio1, rtol=0, atol=0)


@pytest.mark.slow
def test_kv_cache_decoding_equals_full_recomputation(tiny_model):
    cfg = tiny_model.config
    grid = random_grid(cfg, 40, seed=3)[None]
    prefix = 16
    full_text, full_audio = tiny_model(grid)
    for cache in (
        ConcatKVCache(cfg.num_layer_instances),
        StaticKVCache(cfg.num_layer_instances, 1, cfg.num_key_value_heads, 64, cfg.head_dim),
    ):
        text, audio = tiny_model(grid[:, :prefix], cache=cache)
        torch.testing.assert_close(text, full_text[:, :prefix], atol=ATOL, rtol=0)
        for t in range(prefix, grid.shape[1]):  # 24 single-token steps
            text, audio = tiny_model(grid[:, t : t + 1], cache=cache, last_only=True)
            torch.testing.assert_close(text, full_text[:, t], atol=ATOL, rtol=0)
            torch.testing.assert_close(audio, full_audio[:, t], atol=ATOL, rtol=0)


def test_left_padded_batch_equals_each_alone(tiny_model):
    cfg = tiny_model.config
    prompts = [random_grid(cfg, n, seed=10 + n) for n in (5, 13, 9)]
    grid, mask = left_pad(prompts, cfg)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    text, audio = tiny_model(grid, positions, mask, last_only=True)
    for i, p in enumerate(prompts):
        t1, a1 = tiny_model(p[None], last_only=True)
        torch.testing.assert_close(text[i], t1[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(audio[i], a1[0], atol=ATOL, rtol=0)


def test_static_cache_rows_with_different_lengths(tiny_model):
    """Continuous batching: one decode step over slots whose sequences have different lengths."""
    cfg = tiny_model.config
    short, long = random_grid(cfg, 4, seed=24), random_grid(cfg, 11, seed=31)
    nxt_short, nxt_long = random_grid(cfg, 1, seed=40), random_grid(cfg, 1, seed=41)
    cache = StaticKVCache(cfg.num_layer_instances, 2, cfg.num_key_value_heads, 32, cfg.head_dim)
    tiny_model(short[None], cache=cache.view([1]))  # prefill slot 1 alone (as the runtimes admit a request) ...
    tiny_model(long[None], cache=cache.view([0]))  # ... and the other sequence into slot 0
    cache.active = 2
    assert cache.lengths.tolist() == [11, 4]
    text, audio = tiny_model(torch.stack([nxt_long[0], nxt_short[0]])[:, None], cache=cache, last_only=True)
    for row, (p, n) in enumerate([(long, nxt_long), (short, nxt_short)]):
        t1, a1 = tiny_model(torch.cat([p, n])[None], last_only=True)
        torch.testing.assert_close(text[row], t1[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(audio[row], a1[0], atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [12, 5]
