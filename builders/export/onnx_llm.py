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
torch 2.9 but present in 2.13, needs no extra dependency, exports the tiny model in ~4 s and is byte-for-byte
deterministic. Moving to `dynamo=True` needs `onnxscript` and example sizes >= 2 on every dynamic axis (the
example inputs below already use 2/3/4).

Weights: inside the .onnx file when the graph is under protobuf's 2 GiB limit (the tiny model), otherwise in
ONE external data file `<name>.onnx.data` beside it (`external_data=None` picks; True/False force).
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.model import MossSpeechForCausalLM, causal_mask, rope_tables

INPUT_NAMES = ["grid", "position_ids", "attention_mask", "past_kv"]
OUTPUT_NAMES = ["text_logits", "audio_logits", "new_kv"]
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin under 2 GiB for the graph itself

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))

    def to_dict(self) -> dict:
        return asdict(self)


class _NewKV:
    """Cache protocol of `ConcatKVCache` over the stacked `past_kv`, remembering only the new K/V."""

    def __init__(self, past_kv: torch.Tensor):
        self.past = past_kv
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer] = (k, v)
        return torch.cat([self.past[layer, 0], k], dim=2), torch.cat([self.past[layer, 1], v], dim=2)

    def advance(self, n: int) -> None:
        pass


class LLMGraph(nn.Module):
    """The model's forward with explicit positions, mask and stacked past: what the ONNX graph computes.

    Written against the model's submodules (not `model.forward`) so that no data-dependent Python int
    (the cache offsets' max) enters the trace: the past length is a shape here."""

    def __init__(self, model: MossSpeechForCausalLM):
        super().__init__()
        self.lm = model
        self.cfg = model.config

    def forward(self, grid, position_ids, attention_mask, past_kv):
        lm, cfg = self.lm, self.cfg
        t = grid.shape[1]
        x = lm.embed(grid)
        past_len = past_kv.shape[4]
        offsets = torch.zeros_like(position_ids[:, 0]) + past_len  # new tokens sit after every row's P slots
        # The additive mask stays fp32 so an fp16 graph adds it in fp32 (no -inf from fp16 overflow).
        mask = causal_mask(offsets, t, attention_mask.shape[1], attention_mask, torch.float32)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        cache = _NewKV(past_kv)
        h = lm.model.shared_block(x, cos, sin, mask, cache)
        text_h = lm.model.text_norm(lm.model.text_block(h, cos, sin, mask, cache))
        audio_h = lm.model.audio_norm(lm.model.audio_block(h, cos, sin, mask, cache))
        text = lm.text_lm_head(text_h[:, -1]).float()
        audio = lm.audio_lm_head(audio_h[:, -1]).float()
        new = [torch.stack(cache.new[i]) for i in range(cfg.num_layer_instances)]  # [2, B, kv, T, D] each
        return text, audio, torch.stack(new)


def example_inputs(cfg: MossSpeechConfig, batch: int = 2, new: int = 3, past: int = 4,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Distinct sizes >= 2 on every dynamic axis so no axis is specialised to a constant."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack([torch.randint(0, 1000, (batch, new), generator=g),
                        torch.full((batch, new), cfg.audio_pad_token_id)], dim=-1)
    position_ids = past + torch.arange(new).expand(batch, new)
    attention_mask = torch.ones(batch, past + new, dtype=torch.long)
    past_kv = torch.randn(cfg.num_layer_instances, 2, batch, cfg.num_key_value_heads, past, cfg.head_dim,
                          generator=g).to(dtype)
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


def _load(model_or_dir: MossSpeechForCausalLM | str | os.PathLike, dtype: torch.dtype) -> MossSpeechForCausalLM:
    if isinstance(model_or_dir, MossSpeechForCausalLM):
        model = model_or_dir
        if next(model.parameters()).dtype != dtype or next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).to(device="cpu", dtype=dtype)  # never convert the caller's model
        return model.eval()
    return MossSpeechForCausalLM.from_pretrained(model_or_dir, dtype=dtype, device="cpu").eval()


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def export_llm_onnx(model_or_checkpoint_dir: MossSpeechForCausalLM | str | os.PathLike, out_path: str | os.PathLike,
                    opset: int = 17, dtype: torch.dtype | str = torch.float32,
                    external_data: bool | None = None) -> ExportInfo:
    """Write the split LLM as one ONNX graph (contract in the module docstring). Deterministic: the same
    weights give byte-identical files. bf16 is accepted for completeness; onnxruntime's CPU provider has
    no bf16 kernels, so serve fp32/fp16 graphs there."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    t0 = time.perf_counter()
    model = _load(model_or_checkpoint_dir, dtype)
    cfg = model.config
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = LLMGraph(model).eval()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; see the module docstring for why it is used.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(graph, example_inputs(cfg, dtype=dtype), str(raw), dynamo=False, opset_version=opset,
                          input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES,
                          do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
    proto.producer_name, proto.producer_version = "moss-speech", "1"
    proto.doc_string = "MOSS-Speech split LLM: prefill+decode, stacked past_kv in, new_kv out"
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if external_data is None:
        external_data = weight_bytes > _PROTOBUF_LIMIT
    data = out.with_name(out.name + ".data")
    for stale in (out, data):
        stale.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(out))
    files = [out, data] if external_data else [out]
    return ExportInfo(
        path=str(out), data_path=str(data) if external_data else None, dtype=str(dtype).removeprefix("torch."),
        opset=opset, num_layers=cfg.num_layer_instances, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        text_vocab=cfg.vocab_size, audio_vocab=cfg.audio_vocab_size, seconds=time.perf_counter() - t0,
        bytes=sum(f.stat().st_size for f in files), sha256=_sha256(*files))
