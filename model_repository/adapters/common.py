"""Helpers shared by the Python-backend adapters (run inside Triton's Python stub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moss_speech.contract.serving import ServingConfig


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def serving_config(params: dict[str, str]) -> ServingConfig:
    """The repository's serving settings; also pins this process's CPU threads."""
    import torch

    serving = ServingConfig.model_validate_json(params["serving"])
    torch.set_num_threads(serving.cpu_threads)
    return serving


def artifact_path(args: dict[str, Any], params: dict[str, str], key: str) -> Path | None:
    """A model parameter naming an artifact, resolved against the repository root (None when unset); `{model}`
    in it is this model's name. The model's files are checked against the repository's manifest first."""
    rel = params.get(key) or None
    if rel is None:
        return None
    model_dir = Path(args["model_repository"])
    verify_model_files(model_dir.parent, model_dir.name)
    return model_dir.parent / rel.format(model=model_dir.name)


def verify_model_files(repo: Path, model: str) -> None:
    """Refuse to load a model whose artifact files differ from `manifest.json` (written by `moss-speech build`).

    Every file the manifest lists under `<model>/` must exist with its size and sha256. Choice: size always,
    then a full sha256 streamed in 4 MiB chunks (about 1-2 GB/s on one core: seconds for the real model's
    engines, small next to loading them; a sampled hash would miss a flipped byte). Raises ValueError naming
    the file and what differs."""
    import hashlib

    path = repo / "manifest.json"
    if not path.is_file():
        raise ValueError("no manifest.json in the model repository: build it with `moss-speech build`")
    entries = [
        e
        for a in json.loads(path.read_text()).get("artifacts", {}).values()
        for e in a.get("files", [])
        if e.get("root") == "repository" and e["path"].startswith(f"{model}/")
    ]
    for e in entries:
        file = repo / e["path"]
        why = None
        if not file.is_file():
            why = "is missing"
        elif file.stat().st_size != e["bytes"]:
            why = f"has {file.stat().st_size} bytes, the manifest says {e['bytes']}"
        else:
            h = hashlib.sha256()
            with open(file, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            if h.hexdigest() != e["sha256"]:
                why = "differs from the manifest (sha256)"
        if why:
            raise ValueError(
                f"model {model}: artifact {e['path']} {why}; rebuild the repository with `moss-speech build`"
            )


def load_codec(args: dict[str, Any]):
    """The codec runtime the repository names (speech_encoder and vocoder share it) and the model parameters."""
    from moss_speech.model_repository.runtime.factory import load_codec_runtime

    params = model_parameters(args)
    codec = load_codec_runtime(
        serving_config(params), params["codec_dir"], artifact_path(args, params, "codec_artifacts")
    )
    return codec, params


def instance_device(args: dict[str, Any]) -> str:
    """The torch device of this model instance: `cuda:N` for a KIND_GPU instance (Triton names the GPU), else cpu."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "cpu"


def string_input(pb_utils, request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return None
    item = value[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def array_input(pb_utils, request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def string_tensor(pb_utils, name: str, value: str):
    return pb_utils.Tensor(name, np.array([[value.encode("utf-8")]], dtype=np.object_))


def tensors(pb_utils, arrays: dict[str, np.ndarray]) -> list:
    return [pb_utils.Tensor(name, value) for name, value in arrays.items()]


def error_response(pb_utils, message: str, code: str = "INVALID_ARG"):
    """An error response with a Triton status code when the backend knows it (newer stubs), else the default."""
    err_cls = pb_utils.TritonError
    status = getattr(err_cls, code, None)
    error = err_cls(message, status) if status is not None else err_cls(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
