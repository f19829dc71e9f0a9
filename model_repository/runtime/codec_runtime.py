"""Codec runtime: the codec pipeline (`builders.codec.pipeline`) over built artifacts, one backend per class.

`CodecPipeline` holds everything the backends share (segmenting and batching audio, voices, window assembly,
solver noise, the CFG Euler solve, HiFT noise and trimming); a backend only says how the five graphs run:
  * `torch`        the codec's own eager modules (`SpeechCodec`)
  * `onnxruntime`  the ONNX files written by `export_codec_onnx`
  * `tensorrt`     serialized engines built from those files (UNVERIFIED: needs a GPU; see TensorRTGraph)
The artifact names and graph I/O come from `builders.codec.graphs`: a runtime never imports the export side.
A served codec model's folder holds only the graphs it runs (`graphs.MODEL_GRAPHS`): the runtime loads the graphs
present there (or the ones named) and a call into an absent graph raises, naming it. Built-in voices come from
the conditioning the build computed (`voices/<id>.npz`) when the folder has it, so a vocoder needs no encoder.

encode_pcm(list of 16 kHz float32 PCM) -> list of int64 codes; decode_windows(list of DecodeWindow) -> list of
PCM (n_chunk * 1920 samples each), windows of any voices and lengths batched together.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moss_speech.builders.codec.graphs import (
    ENGINE_SUFFIX,
    GRAPH_IO,
    SPEAKER_NAME,
    VOICE_ARRAYS,
    VOICES_NAME,
    present_graphs,
    read_manifest,
)
from moss_speech.builders.codec.pipeline import CodecPipeline
from moss_speech.builders.codec.voices import Voice
from moss_speech.contract.streaming import StreamingConfig

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class CodecRuntime(CodecPipeline):
    @classmethod
    def from_artifacts(
        cls,
        codec_dir: Path | str,
        artifacts_dir: Path | str,
        backend: str = "onnxruntime",
        streaming: StreamingConfig | None = None,
        **kwargs,
    ) -> CodecRuntime:
        """The runtime for `backend` over a codec dir and the artifacts `export_codec_onnx` wrote there.

        kwargs go to the backend: `graphs` (onnxruntime, tensorrt: the graphs to load; default every graph whose
        file is in `artifacts_dir`), `threads`/`providers` (onnxruntime), `device` (tensorrt), `voices_dir`,
        `limits` (all). The flow settings baked into the graphs (flow_chunk, chunk_mask) are read from the
        manifest; a `streaming` config that disagrees raises.
        """
        manifest = read_manifest(artifacts_dir)
        streaming = streaming or StreamingConfig(chunk_mask=manifest["chunk_mask"])
        if streaming.chunk_mask != manifest["chunk_mask"]:
            raise ValueError(
                f"streaming.chunk_mask={streaming.chunk_mask} but the graphs in {artifacts_dir} were exported "
                f"with chunk_mask={manifest['chunk_mask']}"
            )
        if backend == "torch":
            return TorchCodecRuntime(codec_dir, streaming=streaming, flow_chunk=manifest["flow_chunk"], **kwargs)
        if backend == "onnxruntime":
            return OnnxCodecRuntime(codec_dir, artifacts_dir, streaming=streaming, **kwargs)
        if backend == "tensorrt":
            return TensorRTCodecRuntime(codec_dir, artifacts_dir, streaming=streaming, **kwargs)
        raise ValueError(f"unknown codec backend {backend!r}; choose one of {BACKENDS}")

    def encode_pcm(self, pcms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Batch of float32 mono 16 kHz PCM -> int64 codes per item, ceil(samples / 1280) each."""
        return self.encode_batch(pcms)

    artifacts_dir: Path | None = None

    def _voice_from_file(self, voice_id: str, path: Path) -> Voice:
        """A built-in voice: the build's precomputed conditioning when the artifacts hold it, else computed from
        the recording (which needs the encoder graphs)."""
        pre = self.artifacts_dir / VOICES_NAME / f"{voice_id}.npz" if self.artifacts_dir else None
        if pre is None or not pre.is_file():
            return super()._voice_from_file(voice_id, path)
        with np.load(pre) as f:
            return Voice(voice_id, *(f[k] for k in VOICE_ARRAYS))


class AbsentGraph:
    """Stands in for a graph this model's folder does not hold: calling it is a clear error, not a KeyError."""

    def __init__(self, name: str, artifacts_dir: Path):
        self.name, self.dir = name, artifacts_dir

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"the codec graph {self.name!r} is not served from {self.dir} (this model does not run it)")


def _load_graphs(artifacts_dir: Path, suffix: str, wanted: Sequence[str] | None, load) -> dict:
    """`load(name, path)` for each wanted graph (default: those present), AbsentGraph for the rest."""
    wanted = tuple(wanted) if wanted is not None else present_graphs(artifacts_dir, suffix)
    unknown = set(wanted) - set(GRAPH_IO)
    if unknown or not wanted:
        raise ValueError(
            f"no codec graphs to load from {artifacts_dir}"
            if not wanted
            else f"unknown codec graphs {sorted(unknown)}; known: {list(GRAPH_IO)}"
        )
    return {
        k: load(k, artifacts_dir / f"{k}{suffix}") if k in wanted else AbsentGraph(k, artifacts_dir) for k in GRAPH_IO
    }


def _load_speaker(artifacts_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The speaker affine layer (only the vocoder's folder holds it; only decoding uses it)."""
    if not (artifacts_dir / SPEAKER_NAME).is_file():
        return None
    with np.load(artifacts_dir / SPEAKER_NAME) as f:
        return torch.from_numpy(f["weight"]), torch.from_numpy(f["bias"])


# ------------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------------
class TorchCodecRuntime(CodecRuntime):
    """The reference: the codec's eager modules (the same ones `SpeechCodec` runs), batched by the pipeline."""

    backend = "torch"

    def __init__(
        self,
        codec_dir: Path | str,
        streaming: StreamingConfig | None = None,
        flow_chunk: int = 0,
        threads: int | None = None,
        **kwargs,
    ):
        from moss_speech.builders.codec.codec import SpeechCodec

        if threads:
            torch.set_num_threads(threads)
        super().__init__(codec_dir, streaming, **kwargs)
        self.codec = SpeechCodec(self.dir, streaming=self.streaming, flow_chunk=flow_chunk, limits=self.limits)
        self.use_graphs(self.codec.graphs, self.codec.speaker)


# ------------------------------------------------------------------------------------------------------------
# onnxruntime
# ------------------------------------------------------------------------------------------------------------
class OrtGraph:
    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.inputs = tuple(i.name for i in self.session.get_inputs())

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {k: np.ascontiguousarray(t.numpy()) for k, t in zip(self.inputs, inputs, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class OnnxCodecRuntime(CodecRuntime):
    backend = "onnxruntime"

    def __init__(
        self,
        codec_dir: Path | str,
        artifacts_dir: Path | str,
        threads: int | None = None,
        providers: list[str] | None = None,
        streaming: StreamingConfig | None = None,
        graphs: Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(codec_dir, streaming, **kwargs)
        self.artifacts_dir = Path(artifacts_dir)

        def load(name: str, path: Path) -> OrtGraph:
            g = OrtGraph(path, threads, providers)
            if g.inputs != GRAPH_IO[name][0]:
                raise ValueError(f"{name}.onnx inputs {g.inputs} != expected {GRAPH_IO[name][0]}")
            return g

        self.use_graphs(_load_graphs(self.artifacts_dir, ".onnx", graphs, load), _load_speaker(self.artifacts_dir))


# ------------------------------------------------------------------------------------------------------------
# TensorRT (UNVERIFIED: written against the TensorRT 10 Python API; executing engines needs a GPU, which the
# CI machines lack. Only the ONNX parse + engine build is tested, via builders.export.tensorrt.build_engine.)
# ------------------------------------------------------------------------------------------------------------
class TensorRTGraph:
    """One deserialized engine: CPU tensors in (GRAPH_IO order) -> CPU tensor out, run on CUDA tensors."""

    def __init__(self, path: Path, inputs: tuple[str, ...], device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError:  # TensorRT-RTX ships the same API under another name
            import tensorrt_rtx_bindings as trt

        self.trt, self.device = trt, torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        # From a read-only mapping of the file (as the LLM runtime does): no host copy of the engine is made.
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (another TensorRT version, or TensorRT-RTX?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if set(self.inputs) != set(inputs):
            raise ValueError(f"{path.name} inputs {self.inputs} != expected {inputs}")
        self.inputs = inputs  # the pipeline passes inputs in GRAPH_IO order, not the engine's

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        keep = []
        for name, t in zip(self.inputs, inputs, strict=True):
            t = t.contiguous().to(self.device)
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output))
        dtype = torch.int64 if self.engine.get_tensor_dtype(self.output) == self.trt.DataType.INT64 else torch.float32
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.output}")
        stream.synchronize()
        return out.cpu()


class TensorRTCodecRuntime(CodecRuntime):
    """Same pipeline over `<graph>.engine` files next to the ONNX files (`build_codec_engines`). UNVERIFIED."""

    backend = "tensorrt"

    def __init__(
        self,
        codec_dir: Path | str,
        artifacts_dir: Path | str,
        device: str = "cuda",
        streaming: StreamingConfig | None = None,
        graphs: Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(codec_dir, streaming, **kwargs)
        self.artifacts_dir = Path(artifacts_dir)
        loaded = _load_graphs(
            self.artifacts_dir, ENGINE_SUFFIX, graphs, lambda k, path: TensorRTGraph(path, GRAPH_IO[k][0], device)
        )
        self.use_graphs(loaded, _load_speaker(self.artifacts_dir))
