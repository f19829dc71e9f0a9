"""Checkpoint loading shared by the codec networks: one error that names every bad key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not match the network; the message lists every missing/unexpected/mis-shaped
    key."""


def _short(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn both weight-norm storage styles into a plain `weight`.

    `parametrizations.weight.original0/original1` (torch >= 2.1) and `weight_g/weight_v` (older) store
    the same g (norm, one per output channel, dim 0) and v (direction).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".parametrizations.weight.original0"):
            pairs.setdefault(key[: -len(".parametrizations.weight.original0")], {})["g"] = value
        elif key.endswith(".parametrizations.weight.original1"):
            pairs.setdefault(key[: -len(".parametrizations.weight.original1")], {})["v"] = value
        elif key.endswith(".weight_g"):
            pairs.setdefault(key[: -len(".weight_g")], {})["g"] = value
        elif key.endswith(".weight_v"):
            pairs.setdefault(key[: -len(".weight_v")], {})["v"] = value
        else:
            out[key] = value
    broken = [p for p, gv in pairs.items() if set(gv) != {"g", "v"}]
    if broken:
        raise CheckpointError(f"weight-norm halves missing for: {_short(broken)}")
    for prefix, gv in pairs.items():
        g, v = gv["g"].float(), gv["v"].float()
        dims = tuple(range(1, v.dim()))
        out[prefix + ".weight"] = g * v / v.norm(dim=dims, keepdim=True).clamp_min(1e-12)
    return out


def load_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, strict_unexpected: bool = True
) -> list[str]:
    """Copy `state` into `module` (cast to the module dtype). Missing and mis-shaped keys always fail;
    unexpected
    keys fail only when `strict_unexpected`. Returns the ignored (unexpected) keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} (want {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected and strict_unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k].to(t.dtype))
    return sorted(unexpected)


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: file not found in {path.parent}") from None
    except Exception as e:
        raise CheckpointError(f"{path.name}: cannot read torch checkpoint ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: expected a state dict, got {type(state).__name__}")
    return state
