import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_speech.builders.codec.config import CodecConfigError, EncoderConfig, FlowYaml
from moss_speech.builders.codec.encoder import WhisperVQEncoder
from moss_speech.builders.codec.flow import FlowModel
from moss_speech.builders.codec.hift import HiFTGenerator
from moss_speech.builders.codec.weights import CheckpointError


def _speechy(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * np.sin(3 * t))) + 0.05 * rng.standard_normal(n)).astype(
        np.float32
    )


@pytest.mark.parametrize("samples", [1, 1279, 1280, 1281, 16000, 40000, 16000 * 31 + 5])
def test_frame_rate_is_ceil_samples_over_1280(codec, samples):
    codes = codec.encode(_speechy(samples), 16000)
    assert codes.shape == (math.ceil(samples / 1280),)
    assert codes.dtype == np.int64 and (codes >= 0).all() and (codes < 16384).all()


def test_twelve_point_five_codes_per_second_at_any_rate(codec):
    assert len(codec.encode(np.zeros(44100 * 2, np.float32) + 0.01, 44100)) == 25


def test_encoder_is_causal(codec):
    prefix = _speechy(1280 * 12, seed=1)
    longer = np.concatenate([prefix, 0.5 * _speechy(1280 * 9, seed=2)])  # quieter: same log-mel floor
    a, b = codec.encode(prefix, 16000), codec.encode(longer, 16000)
    # the last prefix code's mel window reaches 40 samples past the prefix end (centered STFT)
    np.testing.assert_array_equal(a[:-1], b[: len(a) - 1])
    assert len(set(a.tolist())) > 3  # codes actually vary, so equality means something


def test_encoder_hidden_states_of_prefix_unchanged_and_audio_matters(codec):
    prefix = _speechy(1280 * 12, seed=1)
    longer = np.concatenate([prefix, 0.5 * _speechy(1280 * 9, seed=2)])
    with torch.no_grad():
        h1 = codec.encoder.hidden(codec.mel(torch.from_numpy(prefix)[None]))
        h2 = codec.encoder.hidden(codec.mel(torch.from_numpy(longer)[None]))
    torch.testing.assert_close(h1[:, :-1], h2[:, : h1.shape[1] - 1], atol=1e-5, rtol=1e-5)
    # sensitivity: changing audio early in the prefix changes later hidden states (the check can fail)
    changed = prefix.copy()
    changed[1280 * 2 : 1280 * 3] = np.roll(changed[1280 * 2 : 1280 * 3], 333) * 0.5
    with torch.no_grad():
        h3 = codec.encoder.hidden(codec.mel(torch.from_numpy(changed)[None]))
    assert not torch.allclose(h1[:, 4:], h3[:, 4:], atol=1e-3)
    assert torch.allclose(h1[:, :2], h3[:, :2], atol=1e-5)  # and not earlier ones


def _copy(src, tmp_path):
    dst = tmp_path / "codec"
    shutil.copytree(src, dst)
    return dst


def test_encoder_loader_names_every_bad_key(tiny_codec_dir, tmp_path):
    d = _copy(tiny_codec_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["encoder.layers.0.fc1.weight"]
    del state["encoder.codebook.weight"]
    state["encoder.layers.1.self_attn.k_proj.bias"] = torch.zeros(32)  # k_proj has no bias in Whisper
    state["encoder.conv1.weight"] = torch.zeros(32, 128, 5)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        WhisperVQEncoder.from_dir(d)
    msg = str(err.value)
    for key in ("layers.0.fc1.weight", "codebook.weight", "layers.1.self_attn.k_proj.bias", "conv1.weight"):
        assert key in msg
    assert "(32, 128, 5)" in msg


def test_encoder_ignores_layers_past_quantize_position(tiny_codec_dir):
    state = load_file(str(tiny_codec_dir / "model.safetensors"))
    assert any(k.startswith("encoder.layers.2.") for k in state) and "encoder.layer_norm.weight" in state
    assert len(WhisperVQEncoder.from_dir(tiny_codec_dir).layers) == 2


def test_quantizer_rounds_like_reference_on_near_ties():
    # |c|^2 + |h|^2 - 2 h.c in one addmm, as the reference computes it: |h|^2 does not move the exact argmin
    # but sets the float rounding, so near-equidistant hidden states must resolve to the same row as there.
    cfg = EncoderConfig(
        d_model=256, encoder_attention_heads=4, encoder_ffn_dim=8, quantize_position=1, pooling_position=1
    )
    enc = WhisperVQEncoder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    c = torch.randn(cfg.quantize_vocab_size, cfg.d_model, generator=g) * 30
    enc.codebook.weight.data.copy_(c)
    i, j = torch.randint(0, len(c), (2, 1000), generator=g)
    eps = (torch.rand(1000, 1, generator=g) - 0.5) * 1e-6
    h = ((c[i] + c[j]) / 2 + eps * (c[i] - c[j])).reshape(2, 500, -1)
    enc.hidden = lambda mel: h
    flat = h.reshape(-1, cfg.d_model)
    dist = torch.addmm((c**2).sum(1) + (flat**2).sum(1, keepdim=True), flat, c.t(), alpha=-2.0, beta=1.0)
    with torch.no_grad():
        got = enc(torch.zeros(2, cfg.num_mel_bins, 8))
    assert got.shape == (2, 500)
    assert torch.equal(got, dist.argmin(1).reshape(2, 500))


def test_flow_loader_is_non_strict_for_extra_keys_only(tiny_codec_dir, tmp_path):
    d = _copy(tiny_codec_dir, tmp_path)
    cfg = FlowYaml.from_dir(d).flow
    state = torch.load(d / "flow" / "flow.pt")
    state["decoder.some_training_buffer"] = torch.zeros(3)
    torch.save(state, d / "flow" / "flow.pt")
    assert FlowModel.from_dir(d, cfg).ignored_keys == ["decoder.some_training_buffer"]
    del state["encoder.after_norm.weight"]
    torch.save(state, d / "flow" / "flow.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.after_norm\.weight"):
        FlowModel.from_dir(d, cfg)
    for chunk in (5, 25):
        FlowModel.from_dir(d, cfg, chunk=chunk)


def test_hift_strict_and_both_weight_norm_styles(tiny_codec_dir, tmp_path):
    d = _copy(tiny_codec_dir, tmp_path)
    cfg = FlowYaml.from_dir(d).hift
    mel, noise = torch.randn(1, 80, 6), torch.randn(1, 9, 6 * 480)
    with torch.no_grad():
        ref = HiFTGenerator.from_dir(d, cfg)(mel, noise)
    state = torch.load(d / "flow" / "hift.pt")
    old = {}
    for k, v in state.items():  # rewrite as weight_g / weight_v
        old[
            k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            )
        ] = v
    assert any(k.endswith("weight_g") for k in old)
    torch.save({f"generator.{k}": v for k, v in old.items()}, d / "flow" / "hift.pt")
    with torch.no_grad():
        torch.testing.assert_close(HiFTGenerator.from_dir(d, cfg)(mel, noise), ref)
    old["extra.weight"] = torch.zeros(1)
    torch.save(old, d / "flow" / "hift.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        HiFTGenerator.from_dir(d, cfg)


def test_config_errors_name_the_field(tiny_codec_dir, tmp_path):
    d = _copy(tiny_codec_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["encoder_attention_heads"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CodecConfigError, match="encoder_attention_heads"):
        EncoderConfig.from_dir(d)
    text = (d / "flow" / "config.yaml").read_text().replace("hop_size: 480", "hop_size: 256")
    (d / "flow" / "config.yaml").write_text(text)
    with pytest.raises(CodecConfigError, match="feat_extractor.hop_size"):
        FlowYaml.from_dir(d)


def test_flow_yaml_refs_resolved(tiny_codec_dir):
    fy = FlowYaml.from_dir(tiny_codec_dir)
    assert fy.flow.estimator.static_chunk_size == 25 * 4
    assert fy.flow.cfm_params.inference_cfg_rate == 0.7 and fy.flow.cfm_params.t_scheduler == "cosine"
    assert fy.samples_per_token == 1920 and fy.hift.samples_per_frame == 480
