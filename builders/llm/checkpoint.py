"""Checkpoint I/O in the exact `fnlp/MOSS-Speech` layout.

Sharded safetensors (`model-0000i-of-0000n.safetensors`) + `model.safetensors.index.json`, bf16 on disk,
the real key names. Loading is strict (one error lists every missing, unexpected or mis-shaped key) and
never holds two copies of the weights: the model is built on the meta device and each tensor is read with
plain file reads (no memory map, so no shard stays resident) straight into its parameter, cast one tensor at a
time: fp32 compute from bf16 shards peaks at the fp32 model plus one bf16 tensor.
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


# safetensors dtype names -> torch dtypes (the ones checkpoints of this model use)
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(f) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, absolute offset of the data section) of an open file."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_into(f, offset: int, out: torch.Tensor) -> None:
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    f.seek(offset)
    done = 0
    while done < len(view):  # large reads can return short
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f.name}: file ends inside a tensor (truncated shard?)")
        done += n


def read_tensor(f, entry: dict, data_start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of an open safetensors file, read into fresh memory and cast to `dtype` (None: stored)."""
    stored = _ST_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    t = torch.empty(entry["shape"], dtype=stored)
    if t.numel() * stored.itemsize != end - begin:
        raise CheckpointError(f"{f.name}: tensor size does not match its header")
    _read_into(f, data_start + begin, t)
    return t if dtype is None or dtype == stored else t.to(dtype)


def iter_tensors(
    path: Path, weight_map: dict[str, str], dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor in `dtype` on `device`), one at a time: the caller holds at most one unconverted tensor."""
    files: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        files.setdefault(file, []).append(key)
    for file, keys in files.items():
        with open(path / file, "rb") as f:
            header, data_start = safetensors_header(f)
            for key in keys:
                yield key, read_tensor(f, header[key], data_start, dtype).to(device)


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


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: MossSpeechConfig | None = None,
) -> MossSpeechForCausalLM:
    path = Path(path)
    cfg = config or MossSpeechConfig.from_dir(path)
    with torch.device("meta"), skip_weight_init():
        model = MossSpeechForCausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    weight_map = shard_files(path)
    check_keys(expected, path, weight_map)
    # Each meta parameter is swapped for its loaded tensor as soon as it is read: no second copy is allocated,
    # and a cast (bf16 shard -> fp32 compute) holds one unconverted tensor at a time.
    for key, tensor in iter_tensors(path, weight_map, dtype, device):
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    return model.eval()


def save_checkpoint(
    model: MossSpeechForCausalLM,
    path: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
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


@torch.no_grad()
def steer_to_stop(
    model: MossSpeechForCausalLM, end_id: int, eosp_id: int, dim: int = 0, level: float = 1024.0, weight: float = 64.0
) -> MossSpeechForCausalLM:
    """Make a random tiny model end its answers deterministically (test models only; nothing is trained).

    Residual dimension `dim` is `level` at every position: every embedding row holds it and no layer writes it
    (o_proj / down_proj rows zeroed). After a tail norm it dominates the normalised state with a positive sign,
    so a head row that reads only `dim` wins the argmax: the text head's `end_id` row and the audio head's EOSP
    row. Greedy decoding then emits EOSP at the first unmasked audio step (k = min_new_tokens) and `end_id` at
    the first text step."""
    m = model.model
    m.embed_tokens.weight[:, dim] = level
    m.audio_embed.weight[:, dim] = level
    for block in (m.shared_block, m.text_block, m.audio_block):
        for layer in block.layers:
            layer.self_attn.o_proj.weight[dim] = 0.0
            layer.mlp.down_proj.weight[dim] = 0.0
    for norm, head, row in ((m.text_norm, model.text_lm_head, end_id), (m.audio_norm, model.audio_lm_head, eosp_id)):
        norm.weight[dim] = 1.0
        head.weight[:, dim] = 0.0
        head.weight[row] = 0.0
        head.weight[row, dim] = weight
    return model


SMALL_FIRST_SPECIAL_ID = 256  # small-vocabulary tiny tokenizer: the special tokens right after the byte tokens


def write_tiny_checkpoint(
    out: str | Path, seed: int = 0, max_shard_bytes: int = 16 * 2**20, small_vocab: bool = False, **config_overrides
) -> MossSpeechConfig:
    """A seeded random checkpoint in the real layout (config, shards, index, tokenizer files, generation config).

    `small_vocab=False`: the real 151,680-wide text vocabulary with every special token at its real id.
    `small_vocab=True`: a 288-token text vocabulary (256 bytes, then the special tokens from id 256); config.json
    and generation_config.json name the ids the tokenizer gives them. The audio vocabulary is the real one in
    both (the codec's codebook fixes it)."""
    from moss_speech.builders.llm.tokenizer import (
        MODALITY_PAD_TOKEN,
        QWEN_FIRST_SPECIAL_ID,
        SOSP_TOKEN,
        write_tiny_tokenizer,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tiny_tokenizer(out, SMALL_FIRST_SPECIAL_ID if small_vocab else QWEN_FIRST_SPECIAL_ID)
    tid = tok.token_to_id
    fields: dict = {}
    if small_vocab:
        fields = dict(
            vocab_size=(tok.get_vocab_size() + 7) // 8 * 8,
            bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"),
            sosp_token_id=tid(SOSP_TOKEN),
            modality_pad_token_id=tid(MODALITY_PAD_TOKEN),
        )
    cfg = tiny_config(**(fields | config_overrides))
    # A larger std than initializer_range gives peaked logits, so the tiny model's choices are not ties.
    model = init_random(MossSpeechForCausalLM(cfg), seed, std=0.5)
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    write_generation_config(out, cfg, stop_ids=[tid("<|endoftext|>"), tid("<|im_end|>")], pad_id=tid("<|endoftext|>"))
    return cfg


def write_generation_config(out: str | Path, cfg: MossSpeechConfig, stop_ids: list[int], pad_id: int) -> None:
    """generation_config.json as Qwen3 checkpoints ship it (reference demo sampling defaults)."""
    (Path(out) / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": stop_ids,
                "pad_token_id": pad_id,
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.95,
                "top_k": 20,
                "repetition_penalty": 1.1,
            },
            indent=2,
        )
        + "\n"
    )
