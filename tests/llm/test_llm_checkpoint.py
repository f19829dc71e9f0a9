"""Checkpoint layout, strict loading and its error messages, and config validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.checkpoint import INDEX_NAME, CheckpointError, load_model
from moss_speech.builders.llm.tokenizer import load_tokenizer
from moss_speech.contract.serving import ConfigError


def test_tiny_checkpoint_is_in_the_real_layout(tiny_dir):
    raw = json.loads((tiny_dir / "config.json").read_text())
    for field in (
        "num_shared_layers",
        "num_modality_layers",
        "audio_vocab_size",
        "sosp_token_id",
        "eosp_token_id",
        "modality_pad_token_id",
        "audio_pad_token_id",
        "channels",
        "rope_theta",
        "head_dim",
        "vocab_size",
        "model_type",
        "architectures",
    ):
        assert field in raw, field
    assert raw["model_type"] == "moss_speech" and raw["architectures"] == ["MossSpeechForCausalLM"]
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") and s.endswith(".safetensors") for s in shards)
    total = 0
    for shard in shards:
        with safe_open(tiny_dir / shard, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                total += t.numel() * 2
    assert index["metadata"]["total_size"] == total
    tok = load_tokenizer(tiny_dir)
    for token, id_ in [
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<|object_ref_start|>", 151646),
        ("<think>", 151667),
    ]:
        assert tok.token_to_id(token) == id_


def test_round_trip(tiny_dir, tmp_path):
    from moss_speech.builders.llm.checkpoint import save_checkpoint

    model = load_model(tiny_dir)
    save_checkpoint(model, tmp_path, max_shard_bytes=1 << 20)
    again = load_model(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k  # bf16-valued weights survive a bf16 round trip exactly
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def rewrite_shard(path, edit):
    index = json.loads((path / INDEX_NAME).read_text())
    shard = next(f for k, f in sorted(index["weight_map"].items()) if k.endswith("q_norm.weight"))
    with safe_open(path / shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, index, shard)
    save_file(tensors, path / shard)
    (path / INDEX_NAME).write_text(json.dumps(index))


@pytest.fixture
def broken(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_every_key_problem_in_one_error(broken):
    def edit(tensors, index, shard):
        victim = next(k for k in tensors if k.endswith("q_norm.weight"))
        del tensors[victim]  # missing
        tensors["model.extra.weight"] = torch.zeros(2)  # unexpected
        index["weight_map"]["model.extra.weight"] = shard
        wrong = next(k for k in tensors if k.endswith("k_norm.weight"))
        tensors[wrong] = torch.zeros(3, dtype=torch.bfloat16)  # mis-shaped
        edit.names = (victim, wrong)

    rewrite_shard(broken, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    msg = str(e.value)
    victim, wrong = edit.names
    assert "unexpected keys (1): model.extra.weight" in msg
    assert f"{wrong} [3] != expected [16]" in msg
    assert victim in msg  # listed in the index but missing from its shard


def test_missing_key_from_index(broken):
    index = json.loads((broken / INDEX_NAME).read_text())
    gone = "audio_lm_head.weight"
    del index["weight_map"][gone]
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {gone}"):
        load_model(broken)


def test_missing_shard_and_missing_files(broken, tmp_path):
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: {shard.name}"):
        load_model(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((broken / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        load_model(empty)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path / "nowhere")


def test_config_that_does_not_fit_the_weights(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(raw))
    expected = "mis-shaped keys .*mlp.gate_proj.weight \\[128, 64\\] != expected \\[96, 64\\]"
    with pytest.raises(CheckpointError, match=expected):
        load_model(broken)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_hidden_layers": 37}, "num_hidden_layers"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"channels": 3}, "channels"),
        ({"sosp_token_id": 10**7}, "sosp_token_id"),
        ({"eosp_token_id": 20000}, "eosp_token_id"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
        ({"hidden_size": "wide"}, "hidden_size"),
    ],
)
def test_inconsistent_configs_name_the_field(change, field):
    raw = MossSpeechConfig().model_dump() | change
    with pytest.raises(ConfigError, match=field):
        MossSpeechConfig.from_dict(raw)


def test_real_config_values_and_unknown_fields_kept():
    cfg = MossSpeechConfig.from_dict({**MossSpeechConfig().model_dump(), "auto_map": {"x": "y"}})
    assert cfg.num_layer_instances == 40
    assert cfg.kv_bytes_per_token() == 160 * 1024  # 40 x 2 x 8 x 128 x 2 B, as the facts state
    assert cfg.model_dump()["auto_map"] == {"x": "y"}
