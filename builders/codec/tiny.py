"""A seeded random codec in the exact `fnlp/MOSS-Speech-Codec` layout, small enough for CI.

Same files, module structure and key names as the real codec; only widths/depths are smaller where the config
allows (codebook size and flow vocabulary stay full-size because the LLM emits codes 0..16383):
  * encoder: d_model 32, 2 heads, quantize_position 2 (+1 extra stored layer and a final layer_norm, which the
    loader must ignore), pooling after layer 1
  * flow: width 32 instead of 512 (the reference fixes 512 in `pre_lookahead_layer`/`up_layer`; ours reads
    `output_size`), 1+1 conformer blocks, estimator channels [32], 1 transformer per block, 1 mid block
  * hift: base_channels 32, f0 cond_channels 32; rates/kernels/iSTFT as the real one (24 kHz, 480 per frame)
Floating tensors are stored as float16 to keep the directory around 4 MB; the loaders cast to float32.
hift.pt uses the `parametrizations.weight.original0/1` weight-norm style.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from moss_speech.builders.codec.config import (
    CAMPPLUS_NAME,
    DEFAULT_VOICE_ID,
    ENCODER_CONFIG_NAME,
    ENCODER_WEIGHTS_NAME,
    FLOW_CONFIG_NAME,
    FLOW_DIR,
    FLOW_WEIGHTS_NAMES,
    HIFT_WEIGHTS_NAME,
    PREPROCESSOR_CONFIG_NAME,
    VOICES_DIR,
    EncoderConfig,
    FlowYaml,
    PreprocessorConfig,
)
from moss_speech.builders.codec.encoder import WhisperVQEncoder
from moss_speech.builders.codec.flow import FlowModel
from moss_speech.builders.codec.hift import HiFTGenerator
from moss_speech.builders.codec.xvector import write_tiny_campplus

TINY_ENCODER = {
    "d_model": 32,
    "encoder_layers": 3,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "pooling_position": 1,
    "quantize_position": 2,
    "max_source_positions": 1500,
}

TINY_FLOW_YAML = """\
# CosyVoice2-style hyperpyyaml (tiny random MOSS-Speech codec)
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
token_frame_rate: 12.5
token_mel_ratio: 4
chunk_size: 25
num_decoding_left_chunks: -1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 16384
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        num_up_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 32
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
        upsample_stride: !ref <token_mel_ratio>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32]
            dropout: 0.0
            attention_head_dim: 16
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 32
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 32

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""

WEIGHT_NORMED = ("conv_pre", "ups.", "resblocks.", "source_resblocks.", "conv_post", "f0_predictor.condnet.")


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _write_encoder(out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = EncoderConfig(**TINY_ENCODER)
    model = WhisperVQEncoder(cfg)
    with torch.no_grad():
        model.embed_positions.weight.copy_(_sinusoids(cfg.max_source_positions, cfg.d_model))
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    # keys the real checkpoint also holds but the quantizer-only encoder never reads
    extra = WhisperVQEncoder(
        EncoderConfig(**{**TINY_ENCODER, "quantize_position": cfg.encoder_layers, "pooling_position": 1})
    )
    for k, v in extra.state_dict().items():
        if k.startswith(f"layers.{cfg.quantize_position}."):
            state[f"encoder.{k}"] = v
    state["encoder.layer_norm.weight"] = torch.ones(cfg.d_model)
    state["encoder.layer_norm.bias"] = torch.zeros(cfg.d_model)
    state["encoder.embed_positions2.weight"] = _sinusoids(math.ceil(cfg.max_source_positions / 4), cfg.d_model)
    save_file(_half(state), str(out / ENCODER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = cfg.model_dump()
    config.update(
        {
            "architectures": ["WhisperVQEncoder"],
            "model_type": "whisper",
            "decoder_layers": 0,
            "torch_dtype": "float32",
            "vocab_size": 51866,
        }
    )
    (out / ENCODER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    (out / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(PreprocessorConfig().model_dump(), indent=2))


def _weight_norm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(".weight") and k.startswith(WEIGHT_NORMED) and v.dim() == 3:
            base = k[: -len(".weight")]
            out[base + ".parametrizations.weight.original0"] = v.norm(dim=(1, 2), keepdim=True)
            out[base + ".parametrizations.weight.original1"] = v
        else:
            out[k] = v
    return out


def write_tiny_codec(out_dir: Path, seed: int = 0) -> None:
    """Write a seeded random codec directory in the real MOSS-Speech-Codec layout to `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / FLOW_DIR).mkdir(parents=True, exist_ok=True)
    _write_encoder(out_dir, seed)
    (out_dir / FLOW_DIR / FLOW_CONFIG_NAME).write_text(TINY_FLOW_YAML)
    fy = FlowYaml.from_dir(out_dir)
    for i, (_chunk, name) in enumerate(sorted(FLOW_WEIGHTS_NAMES.items())):
        torch.manual_seed(seed * 1000 + 10 + i)
        flow = FlowModel(fy.flow)
        with torch.no_grad():
            for name_p, p in flow.named_parameters():
                if name_p.endswith(("pos_bias_u", "pos_bias_v")):
                    p.normal_(0, 0.1)
        torch.save(_half(flow.state_dict()), out_dir / FLOW_DIR / name)
    torch.manual_seed(seed * 1000 + 20)
    hift = HiFTGenerator(fy.hift)
    with torch.no_grad():
        # keep the random magnitudes (exp of conv_post) small so the output does not sit on the +-0.99 clamp
        hift.conv_post.weight.mul_(0.3)
        hift.conv_post.bias.fill_(-1.0)
        # default init leaves the output nearly independent of the mel; strengthen the mel path
        hift.conv_pre.weight.mul_(5.0)
        for m in hift.ups:
            m.weight.mul_(3.0)
        for m in hift.f0_predictor.condnet.values():
            m.weight.mul_(2.0)
    torch.save(_half(_weight_norm_state(hift.state_dict())), out_dir / FLOW_DIR / HIFT_WEIGHTS_NAME)
    write_tiny_campplus(out_dir / FLOW_DIR / CAMPPLUS_NAME, seed)
    _write_default_voice(out_dir / VOICES_DIR / f"{DEFAULT_VOICE_ID}.wav", seed)


def _write_default_voice(path: Path, seed: int, seconds: float = 1.6, rate: int = 24000) -> None:
    """A synthetic voiced prompt: a gliding harmonic tone with a little noise (no recording ships in git)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wave = 0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
