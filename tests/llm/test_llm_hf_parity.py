"""Exactness against an independent Qwen3 implementation (Hugging Face transformers).

Each head path of the split model is an ordinary Qwen3 stack: shared layers + that tail's layers, then the
tail's norm and head. With the same weights copied into `Qwen3ForCausalLM` (eager attention), the logits of
both heads must match ours, fp32 tightly and bf16 within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def hf_twin(model, tail: str, dtype: torch.dtype):
    cfg = model.config
    kw = dict(
        vocab_size=cfg.vocab_size if tail == "text" else cfg.audio_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_shared_layers + cfg.num_modality_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf_cfg = transformers.Qwen3Config(**kw)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    ours = model.model
    tail_block = ours.text_block if tail == "text" else ours.audio_block
    layers = list(ours.shared_block.layers) + list(tail_block.layers)
    with torch.no_grad():
        for hf_layer, layer in zip(hf.model.layers, layers, strict=True):
            hf_layer.load_state_dict(layer.state_dict())
        hf.model.norm.load_state_dict((ours.text_norm if tail == "text" else ours.audio_norm).state_dict())
        head = model.text_lm_head if tail == "text" else model.audio_lm_head
        hf.lm_head.weight.copy_(head.weight)
    inv_freq = hf.model.rotary_emb.inv_freq.clone()
    hf = hf.to(dtype)
    hf.model.rotary_emb.inv_freq = inv_freq  # .to(dtype) casts buffers; the reference keeps RoPE in fp32
    return hf


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 1e-6)])
@pytest.mark.slow
def test_both_heads_match_qwen3(tiny_dir, dtype, atol):
    from moss_speech.builders.llm.model import MossSpeechForCausalLM

    model = MossSpeechForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 5000, (2, 17), generator=g)
    audio = torch.randint(0, cfg.eosp_token_id, (2, 17), generator=g)
    text[:, 5:11] = cfg.modality_pad_token_id  # an audio stretch in the middle
    audio[:, :5] = cfg.audio_pad_token_id
    grid = torch.stack([text, audio], dim=-1)
    with torch.no_grad():
        ours_text, ours_audio = model(grid)
        embeds = model.embed(grid)
        for tail, ours in (("text", ours_text), ("audio", ours_audio)):
            ref = hf_twin(model, tail, dtype)(inputs_embeds=embeds).logits
            scale = ref.float().abs().max()
            torch.testing.assert_close(ours.float(), ref.float(), atol=atol * max(1.0, float(scale) / 10), rtol=0)
