"""`moss-speech build`: checkpoints -> exported artifacts -> a Triton model repository, idempotently.

Two folders:
  repository  what Triton loads: configs, the engines (gpu) or the served ONNX graphs (cpu), `manifest.json`;
              each model's artifacts in its own model folder (`llm/1/artifacts`, `speech_encoder/1/artifacts`,
              `vocoder/1/artifacts`), each codec model only the graphs it runs (`codec.graphs.MODEL_GRAPHS`:
              the speech encoder's two, the vocoder's three plus the speaker layer and the built-in voices'
              conditioning, computed here with the encoder graphs so a vocoder needs none).
  build cache intermediates kept for rebuilds (`--cache-dir`, default the sibling folder `<repo>.build-cache`):
              the exported ONNX graphs with their external data, codec graphs, timing caches. The served files
              are hard links to the cache's files (a copy across filesystems), so a cpu repository costs no
              extra disk and a gpu repository holds no graph.

Steps form a small graph (export -> engine -> install). Each is keyed by the content hash of its inputs plus
its options; manifest.json lists every file a step made (path, bytes, sha256). A step is up to date only when
its key matches AND every listed file is there with its size and hash (hashes of unchanged files are reused by
size + mtime), so a missing, truncated or changed file is rebuilt, and an intermediate is only rebuilt when a
served artifact needs it. Heavy steps (export, engine build) each run in a fresh process, so what one stage
held is returned to the OS before the next starts: the build's peak is the largest stage's, not their sum.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moss_speech.builders.codec.config import EncoderConfig
from moss_speech.builders.codec.graphs import MANIFEST_NAME, MODEL_GRAPHS, SPEAKER_NAME, VOICES_NAME, graph_of
from moss_speech.builders.config import MossSpeechConfig
from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.writer import write_repository

MANIFEST = "manifest.json"
# Triton treats every folder at the repository root as a model, so artifacts live inside the model folders.
LLM_ARTIFACTS = "llm/1/artifacts"
CODEC_MODELS = tuple(MODEL_GRAPHS)  # both run the codec runtime, each from its own folder with its own graphs
CODEC_CACHE = "codec"  # the build cache's folder with every codec graph (in-process references use it)
# Written into the codec models' parameters; the adapters put their own model name in (common.artifact_path).
CODEC_ARTIFACTS_TEMPLATE = "{model}/1/artifacts/codec"
REPO, CACHE = "repository", "cache"
BUILDER_VERSION = 4  # bump when the build changes what it writes


def code_fingerprint() -> str:
    """Hash of the library's model and export code: artifacts built by other code are rebuilt."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class BuildError(RuntimeError):
    pass


# --- file lists with sizes and hashes ------------------------------------------------------------------------


def sha256_file(path: Path, bar: tqdm | None = None, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if bar:
                bar.update(len(block))
    return h.hexdigest()


def _cached_sha256(path: Path, cache: dict[str, dict], bar: tqdm | None = None) -> str:
    """sha256 of `path`, reused from `cache` when size and mtime are unchanged (a rewrite changes the mtime)."""
    st = path.stat()
    hit = cache.get(str(path))
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        if bar:
            bar.update(st.st_size)
        return hit["sha256"]
    digest = sha256_file(path, bar)
    cache[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def hash_tree(root: Path, cache: dict[str, dict], bar: tqdm | None = None) -> str:
    """sha256 over every file under `root` (relative names + contents), reusing unchanged files' hashes."""
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = _cached_sha256(path, cache, bar)
        total.update(str(path.relative_to(root)).encode() + b"\0" + digest.encode())
    return total.hexdigest()


def describe_files(paths: list[Path], roots: dict[str, Path], cache: dict[str, dict]) -> list[dict[str, Any]]:
    """Manifest entries {root, path, bytes, sha256} for files under one of `roots` (repository / cache)."""
    out = []
    for p in sorted(paths):
        root = next(name for name, r in roots.items() if p.is_relative_to(r))
        out.append(
            {
                "root": root,
                "path": p.relative_to(roots[root]).as_posix(),
                "bytes": p.stat().st_size,
                "sha256": _cached_sha256(p, cache),
            }
        )
    return out


def check_files(
    entries: list[dict[str, Any]], roots: dict[str, Path], cache: dict[str, dict] | None = None
) -> str | None:
    """None when every listed file is present with its size and hash, else why not (naming the file)."""
    if not entries:
        return "no files recorded"
    for e in entries:
        path = roots[e["root"]] / e["path"]
        if not path.is_file():
            return f"{e['path']} is missing"
        size = path.stat().st_size
        if size != e["bytes"]:
            return f"{e['path']} has {size} bytes, the manifest says {e['bytes']}"
        digest = _cached_sha256(path, cache) if cache is not None else sha256_file(path)
        if digest != e["sha256"]:
            return f"{e['path']} was changed (sha256 differs from the manifest)"
    return None


# --- steps -------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    key: str
    outputs: list[Path]  # files or folders this step writes (folders: every file under them)
    run: Callable[[], dict[str, Any]]
    deps: list[str] = field(default_factory=list)
    heavy: bool = True  # run in a fresh process


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


def _isolated(fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Run one stage in a fresh Python process: what it held goes back to the OS when it exits. (A subprocess,
    not multiprocessing: spawn would re-import the caller's __main__.)"""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        job = json.dumps({"fn": fn.__name__, "kwargs": kwargs, "result": str(result)})
        proc = subprocess.run(
            [sys.executable, "-c", "from moss_speech.builders.export.build import _stage_main; _stage_main()", job],
            check=False,
        )
        if proc.returncode < 0 or not result.is_file():
            raise BuildError(
                f"{fn.__name__} died with exit code {proc.returncode} (killed for memory? "
                f"docs/deploy.md gives the build's memory)"
            )
        out = json.loads(result.read_text())
    if "error" in out:
        raise BuildError(f"{fn.__name__}: {out['error']}")
    return out["info"]


def _stage_main() -> None:
    job = json.loads(sys.argv[1])
    try:
        out = {"info": globals()[job["fn"]](**job["kwargs"])}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises BuildError with it
        out = {"error": f"{type(e).__name__}: {e}"}
    Path(job["result"]).write_text(json.dumps(out))


# Stage functions: top level (a spawned process imports them), plain arguments, JSON-able results.


def stage_export_llm(checkpoint: str, out: str, dtype: str) -> dict[str, Any]:
    from moss_speech.builders.export.onnx_llm import export_llm_onnx

    return {"graph": _describe(export_llm_onnx(checkpoint, out, dtype=dtype))}


def stage_llm_engine(
    checkpoint: str, graph: str, plan: str, timing_cache: str, max_slots: int, max_context: int, precision: str
) -> dict[str, Any]:
    from moss_speech.builders.export.tensorrt import build_engine, llm_profiles

    profiles = llm_profiles(MossSpeechConfig.from_dir(checkpoint), max_slots, max_context)
    info = build_engine(graph, plan, profiles, precision=precision, timing_cache=timing_cache)
    return {"engine": _describe(info), "profiles": _describe(profiles)}


def stage_export_codec(codec: str, out: str) -> dict[str, Any]:
    from moss_speech.builders.export.onnx_codec import export_codec_onnx

    return {"graphs": _describe(export_codec_onnx(codec, out))}


def stage_codec_engines(codec: str, out: str, max_batch: int, serving: str) -> dict[str, Any]:
    from moss_speech.builders.export.onnx_codec import build_codec_engines

    streaming = ServingConfig.model_validate_json(serving).streaming()
    # The codec graphs are fp32 (the vocoder's numerics are the audible part); engines keep that.
    engines = build_codec_engines(codec, out, precision="fp32", max_batch=max_batch, streaming=streaming)
    return {"engines": _describe(engines)}


def stage_codec_voices(codec: str, graphs: str, threads: int) -> dict[str, Any]:
    """Every built-in voice's conditioning from its recording, with the exported encoder graphs on
    onnxruntime (what an onnxruntime vocoder computed itself before), written to `<graphs>/voices/<id>.npz`."""
    import numpy as np

    from moss_speech.builders.codec.graphs import ENCODER_GRAPHS, VOICE_ARRAYS
    from moss_speech.model_repository.runtime.codec_runtime import CodecRuntime

    out = Path(graphs) / VOICES_NAME
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runtime = CodecRuntime.from_artifacts(codec, graphs, backend="onnxruntime", threads=threads, graphs=ENCODER_GRAPHS)
    made = {}
    for voice_id, path in sorted(runtime.voices.builtin_files.items()):
        voice = runtime.make_voice(voice_id, path)  # from the recording, never a stale precomputed file
        np.savez(out / f"{voice_id}.npz", **{k: getattr(voice, k) for k in VOICE_ARRAYS})
        made[voice_id] = len(voice.prompt_codes)
    return {"voices": made}


def _model_files(model: str, files: list[Path], graphs: Path) -> list[Path]:
    """The codec files one served model loads: its graphs (and their external data), the export manifest, and
    for the vocoder the speaker layer and the built-in voices' conditioning."""
    own = set(MODEL_GRAPHS[model])
    extra = {SPEAKER_NAME} if model == "vocoder" else set()
    return [
        p
        for p in files
        if graph_of(p) in own
        or p.name == MANIFEST_NAME
        or p.name in extra
        or (model == "vocoder" and p.parent == graphs / VOICES_NAME)
    ]


def _install(pairs: list[tuple[Path, Path]]) -> dict[str, Any]:
    """Put cache files into the repository: hard links (same bytes, no extra disk), copies across filesystems."""
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return {}


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else [])
    return out


def _llm_steps(checkpoint: Path, repo: Path, cache: Path, serving: ServingConfig, source: str) -> list[Step]:
    if serving.llm_runtime == "torch":
        return []
    # onnxruntime serves the fp32 graph (its CPU provider has no bf16 kernels); TensorRT builds from a graph
    # already in the serving dtype, so the network is strongly typed and no precision flag is needed.
    graph_dtype = serving.dtype if serving.llm_runtime == "tensorrt" else "float32"
    graph = cache / "llm" / f"model-{graph_dtype}.onnx"
    export_key = _key(source, "onnx", graph_dtype, BUILDER_VERSION)
    export = Step(
        "llm.onnx",
        export_key,
        [graph, graph.with_name(graph.name + ".data")],
        lambda: _isolated(stage_export_llm, checkpoint=str(checkpoint), out=str(graph), dtype=graph_dtype),
    )
    if serving.llm_runtime == "onnxruntime":
        served = repo / LLM_ARTIFACTS / "model.onnx"

        def install() -> dict[str, Any]:
            pairs = [(graph, served)] + [
                (d, served.with_name(served.name + ".data"))
                for d in [graph.with_name(graph.name + ".data")]
                if d.is_file()
            ]
            return _install(pairs)

        return [
            export,
            Step(
                "llm",
                _key(export_key, "install"),
                [served, served.with_name(served.name + ".data")],
                install,
                deps=["llm.onnx"],
                heavy=False,
            ),
        ]
    plan = repo / LLM_ARTIFACTS / "model.plan"
    timing = cache / "llm" / "timing.cache"
    engine = Step(
        "llm",
        _key(source, "engine", serving.max_slots, serving.max_context, serving.dtype, BUILDER_VERSION),
        [plan, timing],
        lambda: _isolated(
            stage_llm_engine,
            checkpoint=str(checkpoint),
            graph=str(graph),
            plan=str(plan),
            timing_cache=str(timing),
            max_slots=serving.max_slots,
            max_context=serving.max_context,
            precision=_precision(serving),
        ),
        deps=["llm.onnx"],
    )
    return [export, engine]


def _codec_steps(codec: Path, repo: Path, cache: Path, serving: ServingConfig, source: str) -> list[Step]:
    if serving.codec_backend == "torch":
        return []
    graphs = cache / CODEC_CACHE
    export_key = _key(source, "onnx", BUILDER_VERSION)
    made = [graphs / "*.onnx", graphs / "*.onnx.data", graphs / "*.json", graphs / "*.npz"]
    steps = [
        Step("codec.onnx", export_key, made, lambda: _isolated(stage_export_codec, codec=str(codec), out=str(graphs)))
    ]
    voices_key = _key(export_key, "voices", serving.cpu_threads)
    voices = Step(
        "codec.voices",
        voices_key,
        [graphs / VOICES_NAME],
        lambda: _isolated(stage_codec_voices, codec=str(codec), graphs=str(graphs), threads=serving.cpu_threads),
        deps=["codec.onnx"],
    )
    served_key = export_key
    if serving.codec_backend == "tensorrt":
        served_key = _key(source, "engines", serving.model_dump(), BUILDER_VERSION)
        steps.append(
            Step(
                "codec.engines",
                served_key,
                [graphs / "*.engine"],
                lambda: _isolated(
                    stage_codec_engines,
                    codec=str(codec),
                    out=str(graphs),
                    max_batch=serving.vocoder_max_batch,
                    serving=serving.model_dump_json(),
                ),
                deps=["codec.onnx"],
            )
        )
    served_suffix = ".engine" if serving.codec_backend == "tensorrt" else ".onnx"
    targets = [repo / CODEC_ARTIFACTS_TEMPLATE.format(model=m) for m in CODEC_MODELS]

    def install() -> dict[str, Any]:
        # The served files: the graphs (onnxruntime) or engines (tensorrt) plus what the runtime reads beside
        # them (the export's json manifest, speaker.npz); never the ONNX graphs of an engine build.
        keep = (".engine",) if served_suffix == ".engine" else (".onnx", ".data")
        served = [p for p in _files([graphs]) if p.suffix in keep + (".json", ".npz")]
        for t in targets:
            shutil.rmtree(t, ignore_errors=True)
        return _install(
            [
                (p, t / p.relative_to(graphs))
                for m, t in zip(CODEC_MODELS, targets, strict=True)
                for p in _model_files(m, served, graphs)
            ]
        )

    steps.append(
        Step(
            "codec",
            _key(served_key, voices_key, "install", served_suffix),
            targets,
            install,
            deps=[steps[-1].name, voices.name],
            heavy=False,
        )
    )
    return [*steps[:-1], voices, steps[-1]]


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


def default_cache_dir(repo: str | Path) -> Path:
    repo = Path(repo).resolve()
    return repo.with_name(repo.name + ".build-cache")


def codec_graphs_dir(repo: str | Path) -> Path:
    """The build cache's folder with every codec graph of a built repository (for in-process references: the
    served codec models each hold only their own graphs)."""
    manifest = Path(repo) / MANIFEST
    cache = Path(json.loads(manifest.read_text())["cache_dir"]) if manifest.is_file() else default_cache_dir(repo)
    return cache / CODEC_CACHE


def _glob_outputs(outputs: list[Path]) -> list[Path]:
    """Expand `dir/*.ext` patterns, then folders, into files."""
    expanded = []
    for p in outputs:
        expanded.extend(sorted(p.parent.glob(p.name)) if "*" in p.name else [p])
    return _files(expanded)


def build_repository(
    checkpoint: str | Path,
    codec: str | Path,
    target: str,
    out: str | Path,
    serving: ServingConfig | None = None,
    progress: bool = True,
    force: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """Build (or bring up to date) the model repository in `out`; returns the manifest."""
    checkpoint, codec, out = Path(checkpoint), Path(codec), Path(out)
    serving = serving or ServingConfig.for_target(target)
    cfg = MossSpeechConfig.from_dir(checkpoint)  # fail fast on a bad checkpoint directory
    from moss_speech.builders.llm.tokens import SpecialTokens

    SpecialTokens.from_dir(checkpoint, cfg)  # every token id the served llm will read, checked before any work
    EncoderConfig.from_dir(codec)
    if serving.max_context > cfg.max_position_embeddings:
        if "max_context" in serving.model_fields_set:
            raise BuildError(
                f"max_context {serving.max_context} exceeds the model's context "
                f"(max_position_embeddings {cfg.max_position_embeddings})"
            )
        serving = serving.model_copy(update={"max_context": cfg.max_position_embeddings})
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir(out)
    cache.mkdir(parents=True, exist_ok=True)
    roots = {REPO: out.resolve(), CACHE: cache.resolve()}
    out, cache = roots[REPO], roots[CACHE]
    manifest_path = out / MANIFEST
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() and not force else {}
    hashes = old.get("hash_cache", {})

    sizes = sum(p.stat().st_size for root in (checkpoint, codec) for p in root.rglob("*") if p.is_file())
    with tqdm(total=sizes, unit="B", unit_scale=True, desc="hash sources", disable=not progress) as bar:
        sources = {
            "checkpoint": {"path": str(checkpoint.resolve()), "sha256": hash_tree(checkpoint, hashes, bar)},
            "codec": {"path": str(codec.resolve()), "sha256": hash_tree(codec, hashes, bar)},
        }

    steps = {
        s.name: s
        for s in (
            _llm_steps(checkpoint, out, cache, serving, sources["checkpoint"]["sha256"])
            + _codec_steps(codec, out, cache, serving, sources["codec"]["sha256"])
        )
    }
    done = old.get("artifacts", {})
    artifacts: dict[str, Any] = {}
    bar = tqdm(total=len(steps), desc="build artifacts", unit="step", disable=not progress)

    def bring_up_to_date(name: str) -> None:
        """Run `name` (after its stale dependencies) unless its key matches and its files verify."""
        if name in artifacts:
            return
        step, prev = steps[name], done.get(name, {})
        stale = "key changed" if prev.get("key") != step.key else check_files(prev.get("files", []), roots, hashes)
        if stale is None:
            artifacts[name] = {k: v for k, v in prev.items() if k != "rebuilt_because"} | {"skipped": True}
            bar.update()
            return
        for dep in step.deps:
            bring_up_to_date(dep)
        bar.set_postfix_str(f"{name} ({stale})")
        t0 = time.perf_counter()
        info = step.run()
        files = describe_files(_glob_outputs(step.outputs), roots, hashes)
        if not files:
            raise BuildError(f"step {name} wrote no files")
        artifacts[name] = {
            "key": step.key,
            "seconds": round(time.perf_counter() - t0, 2),
            "bytes": sum(f["bytes"] for f in files),
            "skipped": False,
            "rebuilt_because": stale,
            "files": files,
            **info,
        }
        bar.update()

    # The served artifacts pull in the intermediates they need; an intermediate no served artifact needs is
    # left as it is (its manifest entry is carried over).
    served = [n for n in steps if not any(n in s.deps for s in steps.values())]
    for name in served:
        bring_up_to_date(name)
    for name in steps:
        if name not in artifacts and name in done:
            artifacts[name] = done[name] | {"skipped": True, "needed": False}
    bar.close()

    llm_artifact = {"onnxruntime": f"{LLM_ARTIFACTS}/model.onnx", "tensorrt": f"{LLM_ARTIFACTS}/model.plan"}.get(
        serving.llm_runtime
    )
    codec_artifacts = CODEC_ARTIFACTS_TEMPLATE if serving.codec_backend != "torch" else None
    write_repository(out, serving, checkpoint, codec, llm_artifact, codec_artifacts)
    manifest = {
        "target": target,
        "serving": serving.model_dump(),
        "sources": sources,
        "cache_dir": str(cache),
        "artifacts": artifacts,
        "tools": tool_versions(),
        "models": ["speech_encoder", "llm", "vocoder", "s2s", "t2s"],
        "hash_cache": hashes,
    }
    tmp = manifest_path.with_name(MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    if '"backend": "tensorrt-rtx"' in json.dumps(artifacts):
        print(
            "moss-speech build: no datacenter TensorRT here, so the engines were built with TensorRT-RTX: they prove "
            "the graphs parse and build, but NVIDIA's Triton container cannot load them. Build the gpu target "
            "inside that container (its tensorrt package) to serve.",
            file=sys.stderr,
        )
    return manifest
