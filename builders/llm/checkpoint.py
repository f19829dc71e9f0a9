"""Checkpoint I/O in the exact `fnlp/MOSS-Speech` layout.

Sharded safetensors (`model-0000i-of-0000n.safetensors`) + `model.safetensors.index.json`, bf16 on disk,
the real key names. Loading is strict (one error lists every missing, unexpected or mis-shaped key) and
never holds two copies of the weights: the model is built on the meta device and each tensor is read from
the memory-mapped file straight into its compute dtype.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moss_speech.builders.config import MossSpeechConfig, tiny_config
from moss_speech.builders.llm.model import MossSpeechForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model; the message lists every problem."""


def shard_files(path: Path) -> dict[str, str]:
    """key -> shard file name, from the index (or the single-file layout)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return weight_map
    if (path / SINGLE_NAME).is_file():
        with safe_open(path / SINGLE_NAME, framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {path}")


def check_keys(expected: dict[str, torch.Size], path: Path, weight_map: dict[str, str]) -> None:
    problems: list[str] = []
    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        if key in expected:
            by_file.setdefault(file, []).append(key)
    bad_shape = []
    for file, keys in by_file.items():
        with safe_open(path / file, framework="pt") as f:
            stored = set(f.keys())
            for key in keys:
                if key not in stored:
                    bad_shape.append(f"{key} (index says {file}, not in that file)")
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[key]):
                    bad_shape.append(f"{key} {list(shape)} != expected {list(expected[key])}")
    if bad_shape:
        problems.append(f"mis-shaped keys ({len(bad_shape)}): {', '.join(sorted(bad_shape))}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config:\n  " + "\n  ".join(problems))


def iter_tensors(path: Path, weight_map: dict[str, str], dtype: torch.dtype,
                 device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    files: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        files.setdefault(file, []).append(key)
    for file, keys in files.items():
        with safe_open(path / file, framework="pt", device="cpu") as f:
            for key in keys:
                yield key, f.get_tensor(key).to(device=device, dtype=dtype)


@contextmanager
def skip_weight_init():
    """Module constructors skip their random init: every weight is about to be replaced by a loaded one
    (on the meta device the init would also drag in torch's compiler stack for nothing)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: MossSpeechConfig | None = None) -> MossSpeechForCausalLM:
    path = Path(path)
    cfg = config or MossSpeechConfig.from_dir(path)
    with torch.device("meta"), skip_weight_init():
        model = MossSpeechForCausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    weight_map = shard_files(path)
    check_keys(expected, path, weight_map)
    # assign=True swaps each meta parameter for the loaded tensor: no second copy is ever allocated.
    state = dict(iter_tensors(path, weight_map, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_checkpoint(model: MossSpeechForCausalLM, path: str | Path, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Write config.json, bf16 shards and the index. Returns the shard file names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        # Convert one shard at a time so saving never holds a full second copy either.
        converted = {k: v.detach().to("cpu", dtype).contiguous() for k, v in shard.items()}
        save_file(converted, path / name, metadata={"format": "pt"})
        for k, v in converted.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del converted
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


@torch.no_grad()
def init_random(model: MossSpeechForCausalLM, seed: int, std: float | None = None) -> MossSpeechForCausalLM:
    """Seeded random weights (normal * std, norms near one) — a deterministic stand-in."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range if std is None else std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_tiny_checkpoint(out: str | Path, seed: int = 0, max_shard_bytes: int = 16 * 2**20,
                          **config_overrides) -> MossSpeechConfig:
    """A seeded random checkpoint in the real layout (config, shards, index, tokenizer files)."""
    from moss_speech.builders.llm.tokenizer import write_tiny_tokenizer

    cfg = tiny_config(**config_overrides)
    # A larger std than initializer_range gives peaked logits, so the tiny model's choices are not ties.
    model = init_random(MossSpeechForCausalLM(cfg), seed, std=0.5)
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    write_tiny_tokenizer(Path(out))
    (Path(out) / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg.bos_token_id, "eos_token_id": [151643, 151645], "do_sample": True,
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1,
    }, indent=2) + "\n")
    return cfg
