"""Startup check for a GPU model repository: fail fast, before tritonserver loads anything, when the runtime the
repository was built for cannot run here (no CUDA device, TensorRT missing or of another version than the one that
built the engines, onnxruntime without its CUDA execution provider, torch without CUDA).

Without it a wrong image or node shows up minutes later as a model that failed to load deep in Triton's log.
Reads the repository's `manifest.json` (written by `moss-speech build`: the serving config and the tool versions;
without one, the configs' instance kinds); a CPU repository (KIND_CPU) passes without touching any GPU
library. Imports nothing heavy at module level.
"""

from __future__ import annotations

import ctypes
import importlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class GpuCheckError(RuntimeError):
    """The repository needs a GPU runtime that cannot load here; the message says which and how to fix it."""


def serving_config(repo: str | Path) -> dict[str, Any]:
    """The repository's serving config (kind, llm_runtime, codec_backend) and build facts from its manifest."""
    path = Path(repo) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        # A hand-written repository: only its configs' instance kinds are known (runtimes unchecked).
        gpu = any("KIND_GPU" in c.read_text() for c in Path(repo).glob("*/config.pbtxt"))
        return {"kind": "KIND_GPU" if gpu else "KIND_CPU", "runtimes": [], "tools": {}, "artifacts": {}}
    except (OSError, ValueError) as e:
        raise GpuCheckError(f"{path} cannot be read: {e}") from None
    serving = dict(manifest.get("serving") or {})
    serving["tools"] = manifest.get("tools") or {}
    serving["artifacts"] = manifest.get("artifacts") or {}
    serving["runtimes"] = list(
        dict.fromkeys((serving.get("llm_runtime", "tensorrt"), serving.get("codec_backend", "tensorrt")))
    )
    return serving


def cuda_device_count() -> int:
    """CUDA devices the driver sees (driver API through libcuda; no torch). 0 when there is no driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if cuda.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    return count.value if cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def _import(name: str, why: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure (missing, wrong CUDA libs) means the same here
        raise GpuCheckError(f"{why}, but `import {name}` fails ({type(e).__name__}: {e})") from None


def check_tensorrt(cfg: dict[str, Any]) -> str:
    """TensorRT importable and the version that built the engines (engines do not load across versions)."""
    if any(a.get("backend") == "tensorrt-rtx" for a in cfg["artifacts"].values()):
        raise GpuCheckError(
            "the engines were built with TensorRT-RTX, which NVIDIA's Triton container cannot load: "
            "rebuild the gpu target inside the Triton image (its tensorrt package)"
        )
    trt = _import("tensorrt", "the repository's engines need TensorRT")
    built = cfg["tools"].get("tensorrt")
    here = getattr(trt, "__version__", "?")
    if built and built != here:
        raise GpuCheckError(
            f"the engines were built with TensorRT {built}, this image has {here}: rebuild the "
            "repository with this image (modelRepository.source=build) or use the image that built it"
        )
    return f"tensorrt {here}"


def check_onnxruntime() -> str:
    ort = _import("onnxruntime", "the repository runs onnxruntime on the GPU")
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise GpuCheckError(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
            f"{', '.join(providers)}): install onnxruntime-gpu only (a CPU onnxruntime beside it "
            "shadows it) built for this image's CUDA"
        )
    return f"onnxruntime {ort.__version__} (CUDA)"


def check_torch() -> str:
    torch = _import("torch", "the repository runs torch on the GPU")
    if not torch.cuda.is_available():
        raise GpuCheckError(
            f"torch {torch.__version__} sees no CUDA device (a CPU build, or a CUDA build newer "
            "than the driver): install torch from the CUDA index matching the image"
        )
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


CHECKS = {
    "tensorrt": check_tensorrt,
    "onnxruntime": lambda cfg: check_onnxruntime(),
    "torch": lambda cfg: check_torch(),
}


def check_repository(repo: str | Path) -> list[str]:
    """Raise GpuCheckError when `repo` is a KIND_GPU repository whose runtimes cannot load here; otherwise return
    what was checked (empty for a CPU repository)."""
    cfg = serving_config(repo)
    if cfg.get("kind", "KIND_CPU") != "KIND_GPU":
        return []
    devices = cuda_device_count()
    if devices == 0:
        raise GpuCheckError(
            "the repository is built for the GPU (KIND_GPU) but no CUDA device is visible: run it on a "
            "GPU node with the NVIDIA driver and device plugin (resources nvidia.com/gpu, runtime "
            "class), or build the cpu target"
        )
    found = [f"{devices} CUDA device(s)"]
    for runtime in cfg["runtimes"]:
        found.append(CHECKS[runtime](cfg))
    return found
