"""Generic TensorRT engine builder: ONNX file + optimization profiles -> serialized engine.

Backends, first importable wins:
  `tensorrt`              datacenter TensorRT (ships in NVIDIA's Triton container); the engine Triton runs.
  `tensorrt_rtx_bindings` TensorRT-RTX from PyPI: parses and builds offline with no GPU (CI proof that a graph
                          parses and builds); its engines are not loadable by datacenter TensorRT.

Precision is honest about what each backend can do:
  graph dtype == precision  -> strongly typed network: every tensor keeps the graph's type (both backends).
  fp32 graph, fp16/bf16     -> datacenter only: weakly typed network + BuilderFlag.FP16/BF16 (TensorRT may
                               run layers in the lower type where it is faster; not every layer).
  anything else             -> ValueError (TensorRT-RTX has no precision flags: export the graph in the
                               precision you want, e.g. `export_llm_onnx(..., dtype="float16")`).
No other builder flag is set; TF32 stays at the backend's default. With datacenter TensorRT the timing cache
is loaded before and saved after the build when `timing_cache` is given (a cache from another GPU or version
is rejected, not silently used); TensorRT-RTX has no working timing cache (its API is a deprecated no-op), so
there `EngineInfo.timing_cache` is None and nothing is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import onnx

from moss_speech.builders.config import MossSpeechConfig

Shape = Sequence[int]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

_PRECISIONS = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


class TensorRTUnavailable(ImportError):
    pass


@dataclass
class EngineInfo:
    path: str
    backend: str  # "tensorrt" | "tensorrt-rtx"
    version: str
    precision: str  # what the engine computes in (see module docstring)
    strongly_typed: bool
    flags: list[str]  # builder flags this function set
    profiles: list[dict[str, list[list[int]]]]
    seconds: float
    bytes: int
    timing_cache: str | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """(module, backend name). `prefer` = "tensorrt" or "tensorrt-rtx" to force one."""
    order = [prefer] if prefer else ["tensorrt", "tensorrt-rtx"]
    errors = []
    for name in order:
        try:
            if name == "tensorrt":
                import tensorrt as trt
            elif name == "tensorrt-rtx":
                import tensorrt_rtx_bindings as trt
            else:
                raise ValueError(f"unknown TensorRT backend {name!r}")
            return trt, name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise TensorRTUnavailable(
        "no TensorRT backend importable (" + "; ".join(errors) + "); install the "
        "`trt-rtx` extra for offline builds or use NVIDIA's Triton container"
    )


def graph_float_type(onnx_path: str | os.PathLike) -> int:
    """The weights' dominant floating type (onnx.TensorProto enum); FLOAT when the graph has none."""
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{onnx_path} is not a readable ONNX file: {e}") from e
    counts: dict[int, int] = {}
    for t in proto.graph.initializer:
        if t.data_type in _PRECISIONS.values():
            counts[t.data_type] = counts.get(t.data_type, 0) + 1
    return max(counts, key=counts.get) if counts else onnx.TensorProto.FLOAT


def _make_logger(trt: ModuleType):
    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:  # lower value = more severe
                self.messages.append((severity, msg))

    return Collect()


def _check_profile(network, profile: Profile, index: int) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = set(profile) - set(inputs)
    if unknown:
        raise ValueError(f"profile {index} names {sorted(unknown)}, not inputs of the graph ({sorted(inputs)})")
    for name, dims in inputs.items():
        if -1 in dims and name not in profile:
            raise ValueError(f"profile {index} has no shapes for dynamic input {name!r} {list(dims)}")
    for name, (lo, opt, hi) in profile.items():
        dims = inputs[name]
        for what, s in (("min", lo), ("opt", opt), ("max", hi)):
            if len(s) != len(dims) or any(d != -1 and d != v for d, v in zip(dims, s, strict=True)):
                raise ValueError(f"profile {index} {what} shape {list(s)} of {name!r} does not fit {list(dims)}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ValueError(
                f"profile {index} {name!r}: need min <= opt <= max, got {list(lo)}, {list(opt)}, {list(hi)}"
            )


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    profiles: Profile | Sequence[Profile],
    precision: str = "fp16",
    timing_cache: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
    backend: str | None = None,
) -> EngineInfo:
    """Parse `onnx_path` (external data beside it is found), add one optimization profile per dict, build and
    write the serialized engine. Raises ValueError on bad profiles/precision, RuntimeError with the parser's or
    builder's messages when TensorRT refuses the graph."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    profiles = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    trt, name = import_tensorrt(backend)
    t0 = time.perf_counter()
    graph_type = graph_float_type(onnx_path)
    want = _PRECISIONS[precision]
    flags: list[str] = []
    strongly_typed = graph_type == want
    if not strongly_typed:
        flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
        if graph_type != onnx.TensorProto.FLOAT or flag is None or not hasattr(trt.BuilderFlag, flag):
            have = onnx.TensorProto.DataType.Name(graph_type)
            raise ValueError(
                f"{onnx_path} has {have} weights and {name} cannot build it as {precision} (no "
                f"precision flag for that); export the graph in {precision} or build with the "
                f"graph's own precision"
            )
        flags.append(flag)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{name} could not parse {onnx_path}: " + "; ".join(errs or _msgs(logger)))
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for i, prof in enumerate(profiles):
        _check_profile(network, prof, i)
        p = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in prof.items():
            p.set_shape(input_name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(p)
    # TensorRT-RTX keeps the timing-cache API but its operations are no-ops (deprecated since RTX 1.2), so a
    # cache is only used with datacenter TensorRT.
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None and name == "tensorrt":
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is rejected
    else:
        cache_path = None
    out = Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not _build_to_file(trt, builder, network, config, out):
        raise RuntimeError(f"{name} could not build {onnx_path}: " + "; ".join(_msgs(logger)))
    del network, parser  # the parsed weights
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return EngineInfo(
        path=str(out),
        backend=name,
        version=trt.__version__,
        precision=precision,
        strongly_typed=strongly_typed,
        flags=flags,
        profiles=[{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        seconds=time.perf_counter() - t0,
        bytes=out.stat().st_size,
        timing_cache=str(cache_path) if cache_path else None,
        warnings=_msgs(logger),
    )


def _build_to_file(trt: ModuleType, builder, network, config, out: Path) -> bool:
    """Build and write the engine. Where the backend can stream the plan (`build_serialized_network_to_stream`,
    TensorRT >= 10.11 and TensorRT-RTX) it goes straight to the file: no host copy of the whole plan beside
    the parsed weights and the builder's own."""
    tmp = out.with_name(out.name + ".partial")
    if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):

        class FileWriter(trt.IStreamWriter):
            def __init__(self, f):
                trt.IStreamWriter.__init__(self)
                self.f = f

            def write(self, data) -> int:
                return self.f.write(data)

        with open(tmp, "wb") as f:
            ok = builder.build_serialized_network_to_stream(network, config, FileWriter(f))
    else:
        plan = builder.build_serialized_network(network, config)
        ok = plan is not None
        if ok:
            tmp.write_bytes(memoryview(plan))
        del plan
    if not ok:
        tmp.unlink(missing_ok=True)
        return False
    tmp.replace(out)
    return True


def _msgs(logger) -> list[str]:
    return [str(m) for _, m in logger.messages]


def llm_profiles(
    config: MossSpeechConfig,
    max_batch: int,
    max_context: int,
    opt_batch: int | None = None,
    opt_context: int | None = None,
    max_prefill_batch: int = 1,
) -> list[dict[str, tuple]]:
    """Profiles of the LLM graph (`builders.export.onnx_llm`): index 0 = decode (one new token per row,
    batches up to `max_batch`, past up to `max_context - 1`), index 1 = prefill (up to `max_context` new
    tokens on an empty past). TensorRT checks that each of the min/opt/max points is a consistent set of
    shapes (mask = past + new), so a chunked prefill (past > 0 and new > 1) would need a third profile.
    Past + new never exceeds `max_context`: the runtime checks that before running."""
    if not 1 <= max_context <= config.max_position_embeddings:
        raise ValueError(
            f"max_context {max_context} must be in [1, {config.max_position_embeddings}] (the model's context)"
        )
    layers, kv, d = config.num_layer_instances, config.num_key_value_heads, config.head_dim
    ob = min(opt_batch or max_batch, max_batch)
    oc = min(opt_context or max(1, max_context // 4), max_context)

    def profile(b: tuple[int, int, int], t: tuple[int, int, int], p: tuple[int, int, int]):
        return {
            "grid": tuple((bb, tt, 2) for bb, tt in zip(b, t, strict=True)),
            "position_ids": tuple((bb, tt) for bb, tt in zip(b, t, strict=True)),
            "attention_mask": tuple((bb, min(pp + tt, max_context)) for bb, tt, pp in zip(b, t, p, strict=True)),
            "past_kv": tuple((layers, 2, bb, kv, pp, d) for bb, pp in zip(b, p, strict=True)),
        }

    decode = profile((1, ob, max_batch), (1, 1, 1), (0, oc - 1, max_context - 1))
    pb = max(1, max_prefill_batch)
    prefill = profile((1, 1, pb), (1, oc, max_context), (0, 0, 0))
    return [decode, prefill]
