"""The training recipe schema (`moss-speech train --config FILE`, YAML or JSON).

A recipe is a list of named stages run in order. Each stage says which parameter groups train (with their own
learning rates; every group it does not name is frozen), which data sources it mixes, and for how long.
The public record gives no stage details for MOSS-Speech, so the default below is this project's choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Parameter groups, named after the checkpoint's module prefixes. Text path = the groups text-only input touches.
GROUPS: dict[str, str] = {
    "embed_tokens": "model.embed_tokens.",
    "audio_embed": "model.audio_embed.",
    "shared_block": "model.shared_block.",
    "text_block": "model.text_block.",
    "audio_block": "model.audio_block.",
    "text_norm": "model.text_norm.",
    "audio_norm": "model.audio_norm.",
    "text_lm_head": "text_lm_head.",
    "audio_lm_head": "audio_lm_head.",
}
TEXT_GROUPS = ("embed_tokens", "shared_block", "text_block", "text_norm", "text_lm_head")
AUDIO_GROUPS = ("audio_embed", "audio_block", "audio_norm", "audio_lm_head")
Group = Literal[
    "embed_tokens",
    "audio_embed",
    "shared_block",
    "text_block",
    "audio_block",
    "text_norm",
    "audio_norm",
    "text_lm_head",
    "audio_lm_head",
]
Dtype = Literal["float32", "bfloat16"]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    steps: int = Field(ge=1)
    # group -> peak learning rate; groups not listed are frozen (no gradient, no optimizer state).
    train: dict[Group, float] = Field(min_length=1)
    # data source name -> how many times each of its samples appears per epoch (fractions draw a seeded subset).
    data: dict[str, float] = Field(min_length=1)
    batch_size: int = Field(8, ge=1)  # packed sequences per step
    seq_len: int = Field(256, ge=8)  # rows per packed sequence
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _positive(self) -> StageConfig:
        for group, lr in self.train.items():
            if lr <= 0:
                raise ValueError(f"stage {self.name}: learning rate of {group} must be > 0 (leave it out to freeze)")
        for source, w in self.data.items():
            if w <= 0:
                raise ValueError(f"stage {self.name}: weight of data source {source} must be > 0")
        return self

    def frozen_groups(self) -> list[str]:
        return [g for g in GROUPS if g not in self.train]


class SourceConfig(BaseModel):
    """A JSONL file of conversations (see docs/training.md for the line format). Relative paths are taken
    from the recipe file's folder."""

    model_config = ConfigDict(extra="forbid")

    path: Path


def default_stages(
    audio_lr: float = 1e-3,
    text_lr: float = 1e-4,
    steps: tuple[int, int] = (1000, 1000),
    speech: str = "speech",
    text: str = "text",
) -> list[StageConfig]:
    """The default recipe: 'frozen' (text path frozen, speech parts learn), then 'joint' (speech parts keep
    learning, the shared trunk and text tail thaw at a 10x lower rate, text-only data mixed in)."""
    return [
        StageConfig(
            name="frozen",
            steps=steps[0],
            train={g: audio_lr for g in AUDIO_GROUPS},
            data={speech: 1.0},
            warmup_steps=steps[0] // 20,
        ),
        StageConfig(
            name="joint",
            steps=steps[1],
            train={
                **{g: audio_lr for g in AUDIO_GROUPS},
                "shared_block": text_lr,
                "text_block": text_lr,
                "text_norm": text_lr,
            },
            data={speech: 1.0, text: 0.5},
            warmup_steps=steps[1] // 20,
        ),
    ]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init: Path  # checkpoint directory in the fnlp/MOSS-Speech layout (strict-loaded; its tokenizer is used)
    out: Path  # stage checkpoints go to out/<index>-<stage name>/, the served model to out/final/
    codec: Path | None = None  # codec directory, needed when a source names audio files
    seed: int = 0
    data: dict[str, SourceConfig]
    stages: list[StageConfig] = Field(default_factory=default_stages, min_length=1)
    save_every: int = Field(0, ge=0)  # extra resumable checkpoints every N steps inside a stage (0: stage ends only)
    checkpoint_dtype: Dtype = "float32"  # stage checkpoints: float32 so a resumed run is exact
    export_dtype: Dtype = "bfloat16"  # out/final: the dtype the real checkpoint ships in
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _sources_exist(self) -> TrainConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages:
            unknown = sorted(set(stage.data) - set(self.data))
            if unknown:
                raise ValueError(
                    f"stage {stage.name} uses undefined data sources {unknown}; defined: {sorted(self.data)}"
                )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        raw = yaml.safe_load(path.read_text())
        cfg = cls.model_validate(raw)
        base = path.parent
        # Paths in a recipe are relative to the recipe file, not to the working directory.
        cfg.init, cfg.out = base / cfg.init, base / cfg.out
        cfg.codec = base / cfg.codec if cfg.codec is not None else None
        for src in cfg.data.values():
            src.path = base / src.path
        return cfg
