"""Parameter groups, freezing and checksums.

A frozen parameter has requires_grad=False and is never handed to the optimizer: it gets no gradient and no
optimizer state (so no memory for Adam moments, and weight decay cannot touch it).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from moss_speech.builders.training.config import GROUPS, StageConfig


def group_of(name: str) -> str:
    for group, prefix in GROUPS.items():
        if name.startswith(prefix):
            return group
    raise KeyError(f"parameter {name} belongs to no training group")


def apply_stage(model: nn.Module, stage: StageConfig) -> list[dict]:
    """Set requires_grad per the stage and return the optimizer's param groups (one per trained group)."""
    by_group: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        by_group[group_of(name)].append((name, p))
    param_groups = []
    for group, params in by_group.items():
        trained = group in stage.train
        for _, p in params:
            p.requires_grad_(trained)
            p.grad = None
        if trained:
            # Norm weights are scales, not projections: no weight decay on them (the usual practice).
            decay = 0.0 if group.endswith("norm") else stage.weight_decay
            param_groups.append(
                {
                    "params": [p for _, p in params],
                    "names": [n for n, _ in params],
                    "group": group,
                    "lr": stage.train[group],
                    "base_lr": stage.train[group],
                    "weight_decay": decay,
                }
            )
    return param_groups


def make_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    groups = apply_stage(model, stage)
    # foreach=False keeps the update order fixed, so a resumed run repeats an uninterrupted one bit for bit.
    return torch.optim.AdamW(groups, betas=stage.betas, foreach=False)


def tensor_checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def checksums(model: nn.Module, groups: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
    """sha256 of every parameter's bytes (optionally only those in `groups`)."""
    return {n: tensor_checksum(p) for n, p in model.named_parameters() if groups is None or group_of(n) in groups}
