"""Codec configuration schemas: one place for every number the codec uses.

Three files of the real `fnlp/MOSS-Speech-Codec` directory are described here:
  * `config.json`              -> `EncoderConfig` (Whisper-VQ encoder, GLM-4-Voice `WhisperVQConfig` field
  names)
  * `preprocessor_config.json` -> `PreprocessorConfig` (Whisper feature extractor)
  * `flow/config.yaml`         -> `FlowConfig` / `HiftConfig` / `PromptMelConfig` (CosyVoice2 hyperpyyaml)
Serving settings (`StreamingConfig`: chunk / lookahead / context sizes; `AudioLimits`) live in `moss_speech.contract`.

Unknown fields are kept (extra="allow"). Validation errors name the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENCODER_CONFIG_NAME = "config.json"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
ENCODER_WEIGHTS_NAME = "model.safetensors"
FLOW_DIR = "flow"
FLOW_CONFIG_NAME = "config.yaml"
FLOW_WEIGHTS_NAMES = {0: "flow.pt", 5: "flow-chunk-5.pt", 25: "flow-chunk-25.pt"}  # by trained chunk size
HIFT_WEIGHTS_NAME = "hift.pt"
CAMPPLUS_NAME = "campplus.onnx"
VOICES_DIR = "voices"
DEFAULT_VOICE_ID = "default"

# Fixed by the reference (CosyVoice2 CausalConditionalCFM): one noise buffer drawn once with this seed and
# size.
FLOW_NOISE_SEED = 0
FLOW_NOISE_FRAMES = 15000
XVECTOR_DIM = 192  # CAM++ output
FBANK_SAMPLE_RATE = 16000  # CAM++ / Kaldi fbank input rate
FBANK_BINS = 80


class CodecConfigError(ValueError):
    """A codec config file that cannot describe a working codec; the message names the file and field."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @classmethod
    def parse(cls, data: dict[str, Any], source: str):
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            fields = "; ".join(f"`{'.'.join(map(str, err['loc']))}`: {err['msg']}" for err in e.errors())
            raise CodecConfigError(f"{source}: {fields}") from None
        except CodecConfigError as e:
            raise CodecConfigError(f"{source}: {e}") from None


def _bad(field: str, why: str) -> None:
    raise CodecConfigError(f"field `{field}`: {why}")


# ------------------------------------------------------------------------------------------------------------
# config.json: Whisper-VQ encoder
# ------------------------------------------------------------------------------------------------------------
class EncoderConfig(_Schema):
    architectures: list[str] = Field(default_factory=lambda: ["WhisperVQEncoder"])
    model_type: str = "whisper"
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as in HF Whisper
    pooling_kernel_size: int | None = 4
    pooling_type: str = "avg"
    pooling_position: int | None = 16
    quantize_position: int = 16
    quantize_vocab_size: int = 16384
    quantize_encoder_only: bool = True
    quantize_causal_encoder: bool = True
    quantize_causal_block_size: int | None = 200  # ignored by the MOSS variant (fully causal)
    encoder_causal_attention: bool = True
    encoder_causal_convolution: bool = True

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        for name in (
            "num_mel_bins",
            "d_model",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "max_source_positions",
            "quantize_position",
            "quantize_vocab_size",
        ):
            if getattr(self, name) <= 0:
                _bad(name, f"must be positive, got {getattr(self, name)}")
        if self.d_model % self.encoder_attention_heads:
            _bad(
                "encoder_attention_heads",
                f"{self.encoder_attention_heads} does not divide d_model {self.d_model}",
            )
        if self.pooling_type != "avg":
            _bad("pooling_type", f"only 'avg' is supported, got {self.pooling_type!r}")
        if self.pooling_kernel_size is None or self.pooling_position is None:
            _bad(
                "pooling_kernel_size",
                "the MOSS codec pools before quantizing; pooling_kernel_size/position required",
            )
        if not 0 < self.pooling_position <= self.quantize_position:
            _bad("pooling_position", f"must be in 1..quantize_position ({self.quantize_position})")
        if self.quantize_position > self.encoder_layers:
            _bad("quantize_position", f"{self.quantize_position} > encoder_layers {self.encoder_layers}")
        if self.activation_function != "gelu":
            _bad("activation_function", f"only 'gelu' is supported, got {self.activation_function!r}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def frames_per_code(self) -> int:
        """Mel frames per code: conv2 stride 2 times the pooling kernel (8 -> 80 ms at hop 160)."""
        return 2 * self.pooling_kernel_size

    @classmethod
    def from_dir(cls, codec_dir: Path) -> EncoderConfig:
        return cls.parse(_read_json(codec_dir / ENCODER_CONFIG_NAME), ENCODER_CONFIG_NAME)


# ------------------------------------------------------------------------------------------------------------
# preprocessor_config.json: Whisper feature extractor
# ------------------------------------------------------------------------------------------------------------
class PreprocessorConfig(_Schema):
    feature_extractor_type: str = "WhisperFeatureExtractor"
    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30  # seconds: audio longer than this is encoded in segments
    n_samples: int = 480000
    nb_max_frames: int = 3000
    padding_value: float = 0.0
    padding_side: str = "right"
    return_attention_mask: bool = False

    @model_validator(mode="after")
    def _check(self) -> PreprocessorConfig:
        for name in ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length"):
            if getattr(self, name) <= 0:
                _bad(name, f"must be positive, got {getattr(self, name)}")
        return self

    @classmethod
    def from_dir(cls, codec_dir: Path) -> PreprocessorConfig:
        return cls.parse(_read_json(codec_dir / PREPROCESSOR_CONFIG_NAME), PREPROCESSOR_CONFIG_NAME)


# ------------------------------------------------------------------------------------------------------------
# flow/config.yaml: CosyVoice2 flow + HiFT
# ------------------------------------------------------------------------------------------------------------
class FlowEncoderConfig(_Schema):
    """`UpsampleConformerEncoder` arguments."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # fixed at 4 in the reference module; a config field here so the tiny codec can shrink it
    input_layer: str = "linear"
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"
    normalize_before: bool = True
    macaron_style: bool = False
    use_cnn_module: bool = False
    static_chunk_size: int = 25  # tokens
    upsample_stride: int = 4
    key_bias: bool = True

    @model_validator(mode="after")
    def _check(self) -> FlowEncoderConfig:
        if self.output_size % self.attention_heads:
            _bad(
                "encoder.attention_heads",
                f"{self.attention_heads} does not divide output_size {self.output_size}",
            )
        if self.input_size != self.output_size:
            _bad(
                "encoder.input_size",
                "must equal output_size (the pre-lookahead layer and upsampler use one width)",
            )
        if self.macaron_style or self.use_cnn_module:
            _bad("encoder.macaron_style", "the CosyVoice2 flow encoder has no macaron FFN and no conv module")
        if not self.normalize_before:
            _bad("encoder.normalize_before", "only pre-norm conformer layers are supported")
        return self


class EstimatorConfig(_Schema):
    """`CausalConditionalDecoder` arguments."""

    in_channels: int = 320
    out_channels: int = 80
    channels: list[int] = Field(default_factory=lambda: [256])
    dropout: float = 0.0
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 100  # mel frames
    num_decoding_left_chunks: int = -1

    @model_validator(mode="after")
    def _check(self) -> EstimatorConfig:
        if len(self.channels) != 1:
            _bad(
                "estimator.channels",
                f"only one U-Net level (as in CosyVoice2) is supported, got {self.channels}",
            )
        if self.in_channels != 4 * self.out_channels:
            _bad(
                "estimator.in_channels",
                f"must be 4 x out_channels (x, mu, speaker, cond), got {self.in_channels}",
            )
        if self.act_fn != "gelu":
            _bad("estimator.act_fn", f"only 'gelu' is supported, got {self.act_fn!r}")
        return self


class CfmConfig(_Schema):
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    reg_loss_type: str = "l1"
    n_timesteps: int = 10  # fixed at 10 in the reference inference call

    @model_validator(mode="after")
    def _check(self) -> CfmConfig:
        if self.solver != "euler":
            _bad("cfm_params.solver", f"only 'euler' is supported, got {self.solver!r}")
        if self.t_scheduler not in ("cosine", "linear"):
            _bad("cfm_params.t_scheduler", f"unknown schedule {self.t_scheduler!r}")
        if self.n_timesteps <= 0:
            _bad("cfm_params.n_timesteps", "must be positive")
        return self


class FlowConfig(_Schema):
    """`CausalMaskedDiffWithXvec` arguments."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = XVECTOR_DIM
    vocab_size: int = 20480
    input_frame_rate: float = 12.5
    token_mel_ratio: int = 4
    pre_lookahead_len: int = 3
    encoder: FlowEncoderConfig = Field(default_factory=FlowEncoderConfig)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    cfm_params: CfmConfig = Field(default_factory=CfmConfig)

    @model_validator(mode="after")
    def _check(self) -> FlowConfig:
        if self.input_size != self.encoder.input_size:
            _bad("flow.input_size", f"{self.input_size} != encoder.input_size {self.encoder.input_size}")
        if self.estimator.out_channels != self.output_size:
            _bad("estimator.out_channels", f"must equal flow output_size {self.output_size}")
        if self.encoder.upsample_stride != self.token_mel_ratio:
            _bad("encoder.upsample_stride", f"must equal token_mel_ratio {self.token_mel_ratio}")
        return self


class F0PredictorConfig(_Schema):
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


class HiftConfig(_Schema):
    """`HiFTGenerator` arguments."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: list[int] = Field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = Field(default_factory=lambda: [16, 11, 7])
    istft_params: dict[str, int] = Field(default_factory=lambda: {"n_fft": 16, "hop_len": 4})
    resblock_kernel_sizes: list[int] = Field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = Field(default_factory=lambda: [[1, 3, 5]] * 3)
    source_resblock_kernel_sizes: list[int] = Field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = Field(default_factory=lambda: [[1, 3, 5]] * 3)
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = Field(default_factory=F0PredictorConfig)

    @model_validator(mode="after")
    def _check(self) -> HiftConfig:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            _bad("hift.upsample_kernel_sizes", "needs one kernel per upsample rate")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates):
            _bad("hift.source_resblock_kernel_sizes", "needs one source block per upsample rate")
        if "n_fft" not in self.istft_params or "hop_len" not in self.istft_params:
            _bad("hift.istft_params", "needs n_fft and hop_len")
        return self

    @property
    def n_fft(self) -> int:
        return self.istft_params["n_fft"]

    @property
    def hop_len(self) -> int:
        return self.istft_params["hop_len"]

    @property
    def samples_per_frame(self) -> int:
        prod = 1
        for r in self.upsample_rates:
            prod *= r
        return prod * self.hop_len


class PromptMelConfig(_Schema):
    """`feat_extractor` (matcha mel_spectrogram) arguments: the 24 kHz prompt mel."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = False


class FlowYaml(_Schema):
    """The parts of flow/config.yaml the codec needs."""

    sample_rate: int = 24000
    token_frame_rate: float = 12.5
    flow: FlowConfig = Field(default_factory=FlowConfig)
    hift: HiftConfig = Field(default_factory=HiftConfig)
    feat_extractor: PromptMelConfig = Field(default_factory=PromptMelConfig)

    @model_validator(mode="after")
    def _check(self) -> FlowYaml:
        if self.hift.sampling_rate != self.sample_rate:
            _bad("hift.sampling_rate", f"{self.hift.sampling_rate} != sample_rate {self.sample_rate}")
        if self.feat_extractor.hop_size != self.hift.samples_per_frame:
            _bad(
                "feat_extractor.hop_size",
                f"{self.feat_extractor.hop_size} != HiFT samples per mel frame {self.hift.samples_per_frame}",
            )
        if self.feat_extractor.num_mels != self.flow.output_size:
            _bad("feat_extractor.num_mels", f"must equal flow output_size {self.flow.output_size}")
        return self

    @property
    def samples_per_token(self) -> int:
        return self.flow.token_mel_ratio * self.hift.samples_per_frame

    @classmethod
    def from_dir(cls, codec_dir: Path) -> FlowYaml:
        path = codec_dir / FLOW_DIR / FLOW_CONFIG_NAME
        try:
            raw = load_hyperpyyaml(path.read_text())
        except FileNotFoundError:
            raise CodecConfigError(f"{FLOW_DIR}/{FLOW_CONFIG_NAME}: file not found in {codec_dir}") from None
        except yaml.YAMLError as e:
            raise CodecConfigError(f"{FLOW_DIR}/{FLOW_CONFIG_NAME}: not valid YAML ({e})") from None
        return cls.parse(flow_yaml_to_dict(raw), f"{FLOW_DIR}/{FLOW_CONFIG_NAME}")


# ------------------------------------------------------------------------------------------------------------
# Serving settings
# ------------------------------------------------------------------------------------------------------------
class CodecSizes:
    """Rates and sizes derived from the codec's configs, for classes that hold `flow_yaml`, `pre_cfg` and
    `encoder_cfg` (the PyTorch codec and the serving runtimes)."""

    flow_yaml: FlowYaml
    pre_cfg: PreprocessorConfig
    encoder_cfg: EncoderConfig

    @property
    def sample_rate(self) -> int:
        return self.flow_yaml.sample_rate

    @property
    def input_rate(self) -> int:
        return self.pre_cfg.sampling_rate

    @property
    def samples_per_code_in(self) -> int:
        """16 kHz input samples per code (1280)."""
        return self.pre_cfg.hop_length * self.encoder_cfg.frames_per_code

    @property
    def samples_per_token(self) -> int:
        """24 kHz output samples per token (1920)."""
        return self.flow_yaml.samples_per_token


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CodecConfigError(f"{path.name}: file not found in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise CodecConfigError(f"{path.name}: not valid JSON ({e})") from None


class _TagLoader(yaml.SafeLoader):
    """SafeLoader that reads hyperpyyaml tags (`!new:`, `!name:`, `!ref`, `!apply:`) as plain data."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    if suffix == "ref":
        return {"__ref__": value}
    if isinstance(value, dict):
        return {"__target__": suffix, **value}
    return {"__target__": suffix, "__args__": value}


_TagLoader.add_multi_constructor("!", _tagged)
_REF = re.compile(r"<([^<>]+)>")
_ARITH = re.compile(r"^[0-9eE\s.*/+\-()]+$")


def load_hyperpyyaml(text: str) -> dict[str, Any]:
    """Parse a hyperpyyaml file into plain data, resolving `!ref <key>` (and simple arithmetic of refs)."""
    raw = yaml.load(text, Loader=_TagLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(raw, dict):
        raise CodecConfigError("top level is not a mapping")

    def lookup(path: str) -> Any:
        node: Any = raw
        for part in re.split(r"[.\[\]]+", path.strip()):
            if part:
                node = node[int(part)] if isinstance(node, list) else node[part]
        return resolve(node)

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__ref__"}:
                expr = node["__ref__"]
                whole = _REF.fullmatch(expr.strip())
                if whole:
                    return lookup(whole.group(1))
                sub = _REF.sub(lambda m: repr(lookup(m.group(1))), expr)
                if not _ARITH.match(sub):
                    raise CodecConfigError(f"unsupported !ref expression {expr!r}")
                return eval(sub, {"__builtins__": {}}, {})  # noqa: S307 - digits and operators only
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(raw)


def flow_yaml_to_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """Flatten the CosyVoice2 object tree (flow -> encoder/decoder -> estimator, hift -> f0_predictor)."""

    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items() if k not in ("__target__", "__args__")}
        return node

    out: dict[str, Any] = {}
    for key in ("sample_rate", "token_frame_rate"):
        if key in raw:
            out[key] = raw[key]
    if "flow" in raw:
        flow = dict(raw["flow"])
        decoder = flow.pop("decoder", {}) or {}
        estimator = decoder.get("estimator", {}) if isinstance(decoder, dict) else {}
        cfm = decoder.get("cfm_params", {}) if isinstance(decoder, dict) else {}
        if isinstance(cfm, dict) and "content" in cfm:  # !new:omegaconf.DictConfig {content: {...}}
            cfm = cfm["content"]
        flow = plain(flow)
        flow["estimator"] = plain(estimator)
        flow["cfm_params"] = plain(cfm)
        for drop in ("decoder_conf", "mel_feat_conf"):
            flow.pop(drop, None)
        out["flow"] = flow
    if "hift" in raw:
        out["hift"] = plain(raw["hift"])
    feat = raw.get("feat_extractor")
    if isinstance(feat, dict):
        out["feat_extractor"] = plain(feat)
    return out
