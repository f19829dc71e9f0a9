"""Configuration schemas.

`MossSpeechConfig` mirrors the real `fnlp/MOSS-Speech` config.json: every Qwen3 field plus the fields the
split model adds. Unknown fields are kept (extra="allow") so a newer config.json still loads and round-trips.
The config class in the reference code has wrong defaults (rope_theta 10000, modality_pad_token_id 0), so the
defaults here are the real model's values and `from_dir` always reads config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ServingConfig (how the repository serves) lives in the torch-free contract, with the ConfigError both raise.
from moss_speech.contract.serving import ConfigError

CONFIG_NAME = "config.json"


class MossSpeechConfig(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    # --- Qwen3 fields -------------------------------------------------------------------------------------
    architectures: list[str] = Field(default_factory=lambda: ["MossSpeechForCausalLM"])
    model_type: str = "moss_speech"
    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 36
    # Schema defaults are the real config.json's values; the code reads every id through SpecialTokens
    # (builders/llm/tokens.py), which also consults generation_config.json and the tokenizer.
    bos_token_id: int = 151643  # <|endoftext|> in the Qwen tokenizer
    eos_token_id: int | list[int] = 151645  # <|im_end|>; HF configs may list several
    torch_dtype: str = "bfloat16"

    # --- MOSS-Speech fields -------------------------------------------------------------------------------
    num_shared_layers: int = 32
    num_modality_layers: int = 4
    audio_vocab_size: int = 16512
    sosp_token_id: int = 151646  # start of speech, text channel (<|object_ref_start|>)
    eosp_token_id: int = 16384  # end of speech, audio channel
    modality_pad_token_id: int = 151667  # text channel of an audio row
    audio_pad_token_id: int = 512  # audio channel of a text row (also a valid code)
    channels: int = 2

    @model_validator(mode="after")
    def _consistent(self) -> MossSpeechConfig:
        def bad(field: str, why: str) -> None:
            raise ConfigError(f"config field `{field}`: {why}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_shared_layers",
            "num_modality_layers",
            "audio_vocab_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.num_shared_layers + self.num_modality_layers != self.num_hidden_layers:
            bad(
                "num_hidden_layers",
                f"is {self.num_hidden_layers} but num_shared_layers "
                f"({self.num_shared_layers}) + num_modality_layers ({self.num_modality_layers}) = "
                f"{self.num_shared_layers + self.num_modality_layers}",
            )
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}",
            )
        if self.channels != 2:
            bad("channels", f"must be 2 (text, audio), got {self.channels}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling not in (None, {}):
            bad("rope_scaling", "RoPE scaling is not supported (the real model has none)")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "MOSS-Speech stores untied heads")
        for name in ("sosp_token_id", "modality_pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            for i in value if isinstance(value, list) else [value]:
                if not 0 <= i < self.vocab_size:
                    bad(name, f"{i} is outside the text vocabulary [0, {self.vocab_size})")
        for name in ("eosp_token_id", "audio_pad_token_id"):
            if not 0 <= getattr(self, name) < self.audio_vocab_size:
                bad(name, f"{getattr(self, name)} is outside the audio vocabulary [0, {self.audio_vocab_size})")
        return self

    # --- derived ------------------------------------------------------------------------------------------
    @property
    def num_layer_instances(self) -> int:
        """Layers holding a KV cache: the shared block plus both tails."""
        return self.num_shared_layers + 2 * self.num_modality_layers

    @property
    def audio_code_limit(self) -> int:
        """Audio logits at this index and above are never sampled (EOSP is the last valid one)."""
        return self.eosp_token_id + 1

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.num_layer_instances * 2 * self.num_key_value_heads * self.head_dim * bytes_per_value

    @classmethod
    def from_dir(cls, path: str | Path) -> MossSpeechConfig:
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise ConfigError(f"no {CONFIG_NAME} in {path}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MossSpeechConfig:
        from pydantic import ValidationError

        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            # Surface our own ConfigError message (it names the field) instead of pydantic's wrapper.
            for err in e.errors():
                cause = err.get("ctx", {}).get("error")
                if isinstance(cause, ConfigError):
                    raise cause from None
            fields = ", ".join(".".join(str(p) for p in err["loc"]) + f" ({err['msg']})" for err in e.errors())
            raise ConfigError(f"invalid config fields: {fields}") from None

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(self.model_dump(), indent=2) + "\n")


def tiny_config(**overrides: Any) -> MossSpeechConfig:
    """A small model in the real layout: real vocabularies and special ids, tiny widths and depths."""
    fields: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_shared_layers=2,
        num_modality_layers=2,
        num_hidden_layers=4,
        max_window_layers=4,
        max_position_embeddings=2048,
    )
    fields.update(overrides)
    return MossSpeechConfig(**fields)
