"""Export the split LLM to ONE ONNX graph that serves both prefill and decode.

Graph contract (L = num_layer_instances = shared + text tail + audio tail, in cache order):

| name             | dtype        | shape                     | meaning                                        |
|------------------|--------------|---------------------------|------------------------------------------------|
| `grid`           | int64        | [B, T, 2]                 | new (text, audio) rows                         |
| `position_ids`   | int64        | [B, T]                    | RoPE position of each new row                  |
| `attention_mask` | int64        | [B, P + T]                | 1 = key visible; covers past slots then new    |
| `past_kv`        | model dtype  | [L, 2, B, kv_heads, P, D] | stacked past keys (index 0) and values (1)     |
| `text_logits`    | float32      | [B, Vt]                   | last position only                             |
| `audio_logits`   | float32      | [B, Va]                   | last position only                             |
| `new_kv`         | model dtype  | [L, 2, B, kv_heads, T, D] | K/V of the T new rows only (not past + new)    |

Every row's keys are [its P past slots | its T new tokens]; a row whose sequence is shorter than P keeps its
past left-aligned and masks the tail with `attention_mask`, and its `position_ids` carry its own length. So a
runtime with a preallocated cache gathers the live slots' first P positions, runs the graph, and writes
`new_kv` at each slot's own length: the graph never returns (and the runtime never copies) the whole
present cache. Prefill is the same graph with P = 0.

Exporter: torch's TorchScript-based exporter (`dynamo=False`, opset 17, dynamic_axes). It is deprecated since
torch 2.9 but present in 2.13, needs no extra dependency and is deterministic. The graph is the model's own
`MossSpeechForCausalLM.step` (one implementation of the forward for torch, onnxruntime and TensorRT).

Memory (bounded by one tensor, not the model): the step is traced with every weight passed as a graph INPUT
backed by a zero-stride "ghost" tensor of the real shape (no storage), on a model built on the meta device.
So tracing holds no weights and constant folding cannot copy any. Then each weight input becomes an
initializer streamed one tensor at a time from its source (the checkpoint's shards, or a given model's
parameters) into the output, cast to the graph dtype; a weight read only through `Transpose(perm=[1, 0])`
(how the exporter writes `nn.Linear`) is stored transposed and the Transpose dropped — what torch's constant
folding produced before, without ever holding the model and the written graph together.

Weights: inside the .onnx file when the graph is under protobuf's 2 GiB limit (the tiny model), otherwise in
ONE external data file `<name>.onnx.data` beside it (`external_data=None` picks; True/False force), each tensor
at a 4 KiB-aligned offset (so onnxruntime can map it).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.model import MossSpeechForCausalLM

INPUT_NAMES = ["grid", "position_ids", "attention_mask", "past_kv"]
OUTPUT_NAMES = ["text_logits", "audio_logits", "new_kv"]
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin under 2 GiB for the graph itself
_ALIGN = 4096
_CHUNK_BYTES = 64 * 2**20  # transposed weights are written in column blocks of about this size

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_ONNX_TYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
}


@dataclass
class ExportInfo:
    path: str  # the .onnx file
    data_path: str | None  # the external data file, None when the weights are inside
    dtype: str  # torch dtype name of weights and KV ("float32", "float16", ...)
    opset: int
    num_layers: int  # L, layer instances in past_kv / new_kv
    kv_heads: int
    head_dim: int
    text_vocab: int
    audio_vocab: int
    seconds: float
    bytes: int  # .onnx + external data
    sha256: str  # of the .onnx file (and the data file when there is one)
    weight_bytes: int = 0  # the weights as stored (graph dtype)
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))

    @property
    def files(self) -> list[str]:
        """Every file the graph consists of."""
        return [self.path] + ([self.data_path] if self.data_path else [])

    def to_dict(self) -> dict:
        return asdict(self)


class _WeightsAsInputs(nn.Module):
    """The step with every weight an explicit input, so the trace holds no weights and folds none. The model
    (on the meta device) is not registered as a submodule: the tracer must see no parameters at all."""

    def __init__(self, model: MossSpeechForCausalLM, names: list[str]):
        super().__init__()
        self._model = [model]
        self.names = names

    def forward(self, grid, position_ids, attention_mask, past_kv, *weights):
        model = self._model[0]
        slots = [model.get_submodule(n.rpartition(".")[0])._parameters for n in self.names]
        saved = [p[n.rpartition(".")[2]] for p, n in zip(slots, self.names, strict=True)]
        try:  # swap the parameters for the inputs (torch.func.functional_call refuses to run under the tracer)
            for p, n, w in zip(slots, self.names, weights, strict=True):
                p[n.rpartition(".")[2]] = w
            return model.step(grid, position_ids, attention_mask, past_kv)
        finally:
            for p, n, w in zip(slots, self.names, saved, strict=True):
                p[n.rpartition(".")[2]] = w


def example_inputs(
    cfg: MossSpeechConfig, batch: int = 2, new: int = 3, past: int = 4, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Distinct sizes >= 2 on every dynamic axis so no axis is specialised to a constant."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(
        [
            torch.randint(0, min(1000, cfg.vocab_size), (batch, new), generator=g),  # any vocabulary
            torch.full((batch, new), cfg.audio_pad_token_id),
        ],
        dim=-1,
    )
    position_ids = past + torch.arange(new).expand(batch, new)
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    past_kv = torch.randn(
        cfg.num_layer_instances, 2, batch, cfg.num_key_value_heads, past, cfg.head_dim, generator=g
    ).to(dtype)
    return grid, position_ids, attention_mask, past_kv


DYNAMIC_AXES = {
    "grid": {0: "batch", 1: "new_tokens"},
    "position_ids": {0: "batch", 1: "new_tokens"},
    "attention_mask": {0: "batch", 1: "total_tokens"},
    "past_kv": {2: "batch", 4: "past_tokens"},
    "text_logits": {0: "batch"},
    "audio_logits": {0: "batch"},
    "new_kv": {2: "batch", 4: "new_tokens"},
}


WeightSource = Callable[[str], torch.Tensor]  # parameter name -> the tensor in the graph dtype, on the CPU


def _model_weights(model: MossSpeechForCausalLM, dtype: torch.dtype) -> WeightSource:
    params = dict(model.named_parameters())
    return lambda name: params[name].detach().to("cpu", dtype)  # a copy only when the dtype differs


@contextmanager
def _checkpoint_weights(path: Path, cfg: MossSpeechConfig, dtype: torch.dtype) -> Iterator[WeightSource]:
    """Tensors read from the shards one at a time (plain reads, no memory map) and cast to `dtype`."""
    from moss_speech.builders.llm.checkpoint import check_keys, read_tensor, safetensors_header, shard_files

    with torch.device("meta"):
        expected = {k: v.shape for k, v in MossSpeechForCausalLM(cfg).state_dict().items()}
    weight_map = shard_files(path)
    check_keys(expected, path, weight_map)
    with ExitStack() as stack:
        opened: dict[str, tuple] = {}

        def read(name: str) -> torch.Tensor:
            file = weight_map[name]
            if file not in opened:
                f = stack.enter_context(open(path / file, "rb"))
                opened[file] = (f, *safetensors_header(f))
            f, header, start = opened[file]
            return read_tensor(f, header[name], start, dtype)

        yield read


def _trace(cfg: MossSpeechConfig, dtype: torch.dtype, opset: int, raw: Path) -> list[str]:
    """Trace the step of a weightless model (meta device) with ghost weights as inputs; returns their names."""
    from moss_speech.builders.llm.checkpoint import skip_weight_init

    with torch.device("meta"), skip_weight_init():
        meta = MossSpeechForCausalLM(cfg)
    shapes = {n: p.shape for n, p in meta.named_parameters()}
    ghosts = tuple(torch.zeros((), dtype=dtype).expand(shape) for shape in shapes.values())  # no storage
    module = _WeightsAsInputs(meta, list(shapes)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; see the module docstring for why it is used.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            example_inputs(cfg, dtype=dtype) + ghosts,
            str(raw),
            dynamo=False,
            opset_version=opset,
            input_names=INPUT_NAMES + list(shapes),
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
            do_constant_folding=True,
        )
    return list(shapes)


def _fold_weight_transposes(graph: onnx.GraphProto, names: list[str]) -> dict[str, str]:
    """Drop `Transpose(perm=[1, 0])` nodes that read a weight input; returns weight -> the name its transposed
    initializer must take (the Transpose's output)."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def is_t(node: onnx.NodeProto) -> bool:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        return node.op_type == "Transpose" and perm == [1, 0]

    folded: dict[str, str] = {}
    drop: list[onnx.NodeProto] = []
    for name in names:
        nodes = users.get(name, [])
        if nodes and all(is_t(n) for n in nodes):
            target = nodes[0].output[0]
            rename = {n.output[0]: target for n in nodes[1:]}
            for node in graph.node:
                node.input[:] = [rename.get(i, i) for i in node.input]
            folded[name] = target
            drop.extend(nodes)
    for node in drop:
        graph.node.remove(node)
    return folded


def _write_tensor(f, t: torch.Tensor, transpose: bool) -> None:
    """Raw bytes of `t` (or of t.T, written in column blocks so no full transposed copy is ever held)."""
    if not transpose:
        f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        return
    rows, cols = t.shape
    step = max(1, _CHUNK_BYTES // max(1, rows * t.element_size()))
    for j in range(0, cols, step):
        f.write(t[:, j : j + step].t().contiguous().reshape(-1).view(torch.uint8).numpy())


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def export_llm_onnx(
    model_or_checkpoint_dir: MossSpeechForCausalLM | str | os.PathLike,
    out_path: str | os.PathLike,
    opset: int = 17,
    dtype: torch.dtype | str = torch.float32,
    external_data: bool | None = None,
) -> ExportInfo:
    """Write the split LLM's step as one ONNX graph (contract and memory bound in the module docstring).
    Deterministic: the same weights give byte-identical files. A given model is read, never converted. bf16
    is accepted for completeness; onnxruntime's CPU provider has no bf16 kernels, so serve fp32/fp16 graphs
    there."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in _ONNX_TYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    t0 = time.perf_counter()
    given = isinstance(model_or_checkpoint_dir, MossSpeechForCausalLM)
    cfg = model_or_checkpoint_dir.config if given else MossSpeechConfig.from_dir(model_or_checkpoint_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        names = _trace(cfg, dtype, opset, Path(tmp) / "raw.onnx")
        proto = onnx.load(str(Path(tmp) / "raw.onnx"), load_external_data=False)  # small: no weights inside
    graph = proto.graph
    proto.producer_name, proto.producer_version = "moss-speech", "1"
    proto.doc_string = "MOSS-Speech split LLM: prefill+decode, stacked past_kv in, new_kv out"
    used = {i.name for i in graph.input}
    names = [n for n in names if n in used]
    folded = _fold_weight_transposes(graph, names)
    kept = [i for i in graph.input if i.name not in set(names)]
    del graph.input[:]
    graph.input.extend(kept)

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in MossSpeechForCausalLM(cfg).named_parameters()}
    weight_bytes = sum(shapes[n].numel() * dtype.itemsize for n in names)
    if external_data is None:
        external_data = weight_bytes > _PROTOBUF_LIMIT
    for stale in (out, data):
        stale.unlink(missing_ok=True)
    tmp_graph, tmp_data = out.with_name(out.name + ".partial"), data.with_name(data.name + ".partial")
    with ExitStack() as stack:
        source = (
            _model_weights(model_or_checkpoint_dir, dtype)
            if given
            else stack.enter_context(_checkpoint_weights(Path(model_or_checkpoint_dir), cfg, dtype))
        )
        f = stack.enter_context(open(tmp_data, "wb")) if external_data else None
        for name in names:  # one tensor in memory at a time
            t = source(name)
            transpose = name in folded
            init = onnx.TensorProto(
                name=folded.get(name, name),
                data_type=_ONNX_TYPES[dtype],
                dims=list(t.shape[::-1] if transpose else t.shape),
            )
            if f is None:
                buf = io.BytesIO()
                _write_tensor(buf, t, transpose)
                init.raw_data = buf.getvalue()
            else:
                f.write(b"\0" * (-f.tell() % _ALIGN))
                offset = f.tell()
                _write_tensor(f, t, transpose)
                init.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", f.tell() - offset)):
                    init.external_data.add(key=key, value=str(value))
            graph.initializer.append(init)
            del t
    tmp_graph.write_bytes(proto.SerializeToString())
    del proto
    if external_data:
        tmp_data.replace(data)
    tmp_graph.replace(out)
    files = [out, data] if external_data else [out]
    return ExportInfo(
        path=str(out),
        data_path=str(data) if external_data else None,
        dtype=str(dtype).removeprefix("torch."),
        opset=opset,
        num_layers=cfg.num_layer_instances,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        text_vocab=cfg.vocab_size,
        audio_vocab=cfg.audio_vocab_size,
        seconds=time.perf_counter() - t0,
        bytes=sum(f.stat().st_size for f in files),
        sha256=_sha256(*files),
        weight_bytes=weight_bytes,
    )
