"""Every special token id a checkpoint uses, read from the checkpoint's own files (no id is a constant).

Where each id comes from (the fnlp/MOSS-Speech layout):
  config.json             SOSP, EOSP, modality pad, audio pad (the split model's fields); eos/bos/pad fallbacks
  generation_config.json  `eos_token_id` (an int or a list): the stop ids; `pad_token_id`
  tokenizer.json          <|im_start|>, <|im_end|>, <|endoftext|>, looked up by their text
The reference generation loop stops on <|endoftext|> and <|im_end|> whatever generation_config says, so both
join the stop ids whenever the tokenizer has them (for the real checkpoint: 151643 and 151645 either way).

Torch-free, so the contract and the service can use it too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.contract.serving import ConfigError

GENERATION_CONFIG_NAME = "generation_config.json"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


class TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def _ids(value: Any) -> list[int]:
    """An `eos_token_id`-style field: None, an int, or a list of ints."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the prompt builder, the generation state machine, the scheduler and the adapters need."""

    stop_ids: tuple[int, ...]  # text channel: the row that carries one ends generation (and stays in the output)
    text_pad_id: int  # text channel of left padding (<|endoftext|> in Qwen)
    sosp_id: int  # text channel: start of speech; the next step runs in audio mode
    modality_pad_id: int  # text channel of an audio row
    eosp_id: int  # audio channel: end of speech; the next step runs in text mode
    audio_pad_id: int  # audio channel of a text row (also a valid speech code)
    im_start_id: int | None = None  # chat markers; None only when built from config.json alone
    im_end_id: int | None = None

    @property
    def audio_code_limit(self) -> int:
        """Audio logits at this index and above are never sampled (EOSP is the last valid one)."""
        return self.eosp_id + 1

    def is_stop(self, text_id: int) -> bool:
        return text_id in self.stop_ids

    @property
    def text_markers(self) -> frozenset[int]:
        """Text-channel ids that never reach decoded text: pads, SOSP, chat markers, stop ids."""
        ids = {self.modality_pad_id, self.sosp_id, self.text_pad_id, *self.stop_ids, self.im_start_id, self.im_end_id}
        return frozenset(i for i in ids if i is not None)

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dir(
        cls, path: str | Path, config: MossSpeechConfig | None = None, tokenizer: TokenLookup | None = None
    ) -> SpecialTokens:
        """All ids of the checkpoint at `path` (config.json, generation_config.json, tokenizer.json)."""
        path = Path(path)
        config = config or MossSpeechConfig.from_dir(path)
        if tokenizer is None:
            from moss_speech.builders.llm.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path)
        gen: dict[str, Any] = {}
        file = path / GENERATION_CONFIG_NAME
        if file.is_file():
            try:
                gen = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from e
            if not isinstance(gen, dict):
                raise ConfigError(f"{file} is not a JSON object")
        return cls.from_parts(config, tokenizer, gen)

    @classmethod
    def from_parts(
        cls, config: MossSpeechConfig, tokenizer: TokenLookup, generation_config: dict[str, Any] | None = None
    ) -> SpecialTokens:
        gen = generation_config or {}

        def marker(token: str) -> int:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise ConfigError(f"the tokenizer has no {token} token (the chat template needs it)")
            return int(found)

        im_start, im_end = marker(IM_START), marker(IM_END)
        endoftext = tokenizer.token_to_id(ENDOFTEXT)
        declared = _ids(gen.get("eos_token_id")) or _ids(config.eos_token_id)
        stops = _unique([*declared, *(i for i in (endoftext, im_end) if i is not None)])
        pad = _first(gen.get("pad_token_id"), getattr(config, "pad_token_id", None), endoftext, config.bos_token_id)
        return cls._checked(config, stop_ids=stops, text_pad_id=pad, im_start_id=im_start, im_end_id=im_end)

    @classmethod
    def from_config(cls, config: MossSpeechConfig) -> SpecialTokens:
        """config.json alone, for in-process callers without a checkpoint directory: the stop ids are its
        `eos_token_id` plus the text pad (`pad_token_id`, else `bos_token_id`), which for Qwen configs are
        <|im_end|> and <|endoftext|> — the reference's two stops. Serving always uses `from_dir`."""
        pad = _first(getattr(config, "pad_token_id", None), config.bos_token_id)
        return cls._checked(config, stop_ids=_unique([*_ids(config.eos_token_id), pad]), text_pad_id=pad)

    @classmethod
    def _checked(cls, config: MossSpeechConfig, **ids: Any) -> SpecialTokens:
        tokens = cls(
            sosp_id=config.sosp_token_id,
            modality_pad_id=config.modality_pad_token_id,
            eosp_id=config.eosp_token_id,
            audio_pad_id=config.audio_pad_token_id,
            **ids,
        )
        tokens.validate(config)
        return tokens

    def validate(self, config: MossSpeechConfig) -> None:
        """Clear errors for ids that cannot work with this model (the message names the id)."""
        if not self.stop_ids:
            raise ConfigError("no stop token: generation_config.json / config.json give no eos_token_id")
        text = {
            "stop id": self.stop_ids,
            "text pad": (self.text_pad_id,),
            "<|im_start|>": (self.im_start_id,),
            "<|im_end|>": (self.im_end_id,),
        }
        for name, ids in text.items():
            for i in ids:
                if i is not None and not 0 <= i < config.vocab_size:
                    raise ConfigError(f"{name} {i} is outside the text vocabulary [0, {config.vocab_size})")
        for name, i in (("sosp", self.sosp_id), ("modality pad", self.modality_pad_id)):
            if i in self.stop_ids:
                raise ConfigError(f"the {name} id {i} is also a stop id")
        if self.sosp_id == self.modality_pad_id:
            raise ConfigError(f"sosp and modality pad share id {self.sosp_id}")


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids))


def _first(*candidates: int | None) -> int:
    return next(int(c) for c in candidates if c is not None)
