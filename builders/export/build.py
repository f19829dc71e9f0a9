"""`moss-speech build`: checkpoints -> exported artifacts -> a Triton model repository, idempotently.

Every artifact is keyed by the content hash of its inputs plus its build options; a rebuild with the same key
and the files in place is skipped. `manifest.json` in the repository records sources, tool versions, shapes,
optimization profiles and dtypes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moss_speech.builders.codec.config import EncoderConfig
from moss_speech.builders.config import MossSpeechConfig, ServingConfig
from moss_speech.model_repository.writer import write_repository

MANIFEST = "manifest.json"
# Triton treats every folder at the repository root as a model, so artifacts live inside the model folders.
LLM_ARTIFACTS = "llm/1/artifacts"
CODEC_ARTIFACTS = "vocoder/1/artifacts/codec"
BUILDER_VERSION = 2  # bump when the export code changes what it writes


def code_fingerprint() -> str:
    """Hash of the library's model and export code: artifacts built by other code are rebuilt."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class BuildError(RuntimeError):
    pass


@dataclass
class Step:
    name: str
    key: str
    outputs: list[str]
    run: Callable[[], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def hash_tree(root: Path, cache: dict[str, dict], bar: tqdm | None = None) -> str:
    """sha256 over every file under `root` (relative names + contents). Files whose size and mtime match the
    previous manifest reuse their recorded hash, so an unchanged 17 GB checkpoint is not read again."""
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        st = path.stat()
        hit = cache.get(str(path))
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            digest = hit["sha256"]
            if bar:
                bar.update(st.st_size)
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    if bar:
                        bar.update(len(chunk))
            digest = h.hexdigest()
            cache[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        total.update(rel.encode() + b"\0" + digest.encode())
    return total.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([*parts, _CODE], sort_keys=True, default=str).encode()).hexdigest()[:32]


_CODE = code_fingerprint()


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "builder": str(BUILDER_VERSION), "code": _CODE}
    for dist in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13-bindings", "moss-speech-triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _llm_steps(checkpoint: Path, out: Path, serving: ServingConfig, source: str) -> list[Step]:
    if serving.llm_runtime == "torch":
        return []
    cfg = MossSpeechConfig.from_dir(checkpoint)
    onnx_rel = f"{LLM_ARTIFACTS}/model.onnx"

    # onnxruntime serves the fp32 graph (its CPU provider has no bf16 kernels); TensorRT builds from a graph
    # already in the serving dtype, so the network is strongly typed and no precision flag is needed.
    graph_dtype = serving.dtype if serving.llm_runtime == "tensorrt" else "float32"

    def export() -> dict[str, Any]:
        from moss_speech.builders.export.onnx_llm import export_llm_onnx

        info = export_llm_onnx(checkpoint, out / onnx_rel, dtype=graph_dtype)
        return {"graph": _describe(info)}

    steps = [Step("llm.onnx", _key(source, "onnx", graph_dtype, BUILDER_VERSION), [onnx_rel], export)]
    if serving.llm_runtime == "tensorrt":
        plan_rel = f"{LLM_ARTIFACTS}/model.plan"

        def engine() -> dict[str, Any]:
            from moss_speech.builders.export.tensorrt import build_engine, llm_profiles

            profiles = llm_profiles(cfg, serving.max_slots, serving.max_context)
            info = build_engine(out / onnx_rel, out / plan_rel, profiles, precision=_precision(serving),
                                timing_cache=out / LLM_ARTIFACTS / "timing.cache")
            return {"engine": _describe(info), "profiles": _describe(profiles)}

        steps.append(Step("llm.engine", _key(source, "engine", serving.max_slots, serving.max_context,
                                             serving.dtype, BUILDER_VERSION), [plan_rel], engine))
    return steps


def _codec_steps(codec: Path, out: Path, serving: ServingConfig, source: str) -> list[Step]:
    if serving.codec_backend == "torch":
        return []
    rel = CODEC_ARTIFACTS

    def export() -> dict[str, Any]:
        from moss_speech.builders.export.onnx_codec import export_codec_onnx

        infos = export_codec_onnx(codec, out / rel)
        return {"graphs": _describe(infos)}

    steps = [Step("codec.onnx", _key(source, "onnx", BUILDER_VERSION), [rel], export)]
    if serving.codec_backend == "tensorrt":
        def engines() -> dict[str, Any]:
            from moss_speech.builders.export.onnx_codec import build_codec_engines

            # The codec graphs are fp32 (the vocoder's numerics are the audible part); engines keep that.
            engines = build_codec_engines(codec, out / rel, precision="fp32", max_batch=serving.vocoder_max_batch,
                                          streaming=serving.streaming())
            return {"engines": _describe(engines)}

        steps.append(Step("codec.engines", _key(source, "engines", serving.model_dump(), BUILDER_VERSION),
                          [rel], engines))
    return steps


def _precision(serving: ServingConfig) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[serving.dtype]


def _describe(obj: Any) -> Any:
    """JSON-able view of export/engine info objects (dataclasses, pydantic models, paths)."""
    if hasattr(obj, "model_dump"):
        return _describe(obj.model_dump())
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _describe(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_describe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj if isinstance(obj, str | int | float | bool | type(None)) else str(obj)


def build_repository(checkpoint: str | Path, codec: str | Path, target: str, out: str | Path,
                     serving: ServingConfig | None = None, progress: bool = True, force: bool = False) -> dict:
    """Build (or bring up to date) the model repository in `out`; returns the manifest."""
    checkpoint, codec, out = Path(checkpoint), Path(codec), Path(out)
    serving = serving or ServingConfig.for_target(target)
    cfg = MossSpeechConfig.from_dir(checkpoint)  # fail fast on a bad checkpoint directory
    from moss_speech.builders.llm.tokens import SpecialTokens

    SpecialTokens.from_dir(checkpoint, cfg)  # every token id the served llm will read, checked before any work
    EncoderConfig.from_dir(codec)
    if serving.max_context > cfg.max_position_embeddings:
        if "max_context" in serving.model_fields_set:
            raise BuildError(f"max_context {serving.max_context} exceeds the model's context "
                             f"(max_position_embeddings {cfg.max_position_embeddings})")
        serving = serving.model_copy(update={"max_context": cfg.max_position_embeddings})
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() and not force else {}
    cache = old.get("hash_cache", {})

    sizes = sum(p.stat().st_size for root in (checkpoint, codec) for p in root.rglob("*") if p.is_file())
    with tqdm(total=sizes, unit="B", unit_scale=True, desc="hash sources", disable=not progress) as bar:
        sources = {"checkpoint": {"path": str(checkpoint.resolve()), "sha256": hash_tree(checkpoint, cache, bar)},
                   "codec": {"path": str(codec.resolve()), "sha256": hash_tree(codec, cache, bar)}}

    steps = (_llm_steps(checkpoint, out, serving, sources["checkpoint"]["sha256"])
             + _codec_steps(codec, out, serving, sources["codec"]["sha256"]))
    done = old.get("artifacts", {})
    artifacts: dict[str, Any] = {}
    with tqdm(steps, desc="build artifacts", unit="step", disable=not progress) as bar:
        for step in bar:
            bar.set_postfix_str(step.name)
            prev = done.get(step.name, {})
            if prev.get("key") == step.key and all((out / o).exists() for o in step.outputs):
                artifacts[step.name] = prev | {"skipped": True}
                continue
            t0 = time.perf_counter()
            info = step.run()
            seconds = round(time.perf_counter() - t0, 2)
            artifacts[step.name] = {"key": step.key, "outputs": step.outputs, "seconds": seconds,
                                    "bytes": sum(_size(out / o) for o in step.outputs), "skipped": False, **info}

    llm_artifact = next((o for s in steps for o in s.outputs if s.name == "llm." + (
        "engine" if serving.llm_runtime == "tensorrt" else "onnx")), None)
    codec_artifacts = CODEC_ARTIFACTS if serving.codec_backend != "torch" else None
    write_repository(out, serving, checkpoint, codec, llm_artifact, codec_artifacts)
    manifest = {
        "target": target, "serving": serving.model_dump(), "sources": sources, "artifacts": artifacts,
        "tools": tool_versions(), "models": ["speech_encoder", "llm", "vocoder", "s2s", "t2s"],
        "hash_cache": cache,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if '"backend": "tensorrt-rtx"' in json.dumps(artifacts):
        print("moss-speech build: no datacenter TensorRT here, so the engines were built with TensorRT-RTX: they prove "
              "the graphs parse and build, but NVIDIA's Triton container cannot load them. Build the gpu target "
              "inside that container (its tensorrt package) to serve.", file=sys.stderr)
    return manifest


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
