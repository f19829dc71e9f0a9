"""Decode steps of the torch runtime replayed as CUDA graphs.

An eager decode step of the real model launches over a thousand small kernels (40 layer instances); on a GPU the
step is then bound by the CPU issuing them, not by reading the weights. A CUDA graph records one step's kernels
once and replays them with one launch.

A graph has fixed shapes, so steps are grouped: the batch is padded up to a bucket (1, 2, 4, ... max_slots) and
the attention reads a key span rounded up to `span_step` tokens. Padded rows read and write one spare cache slot
(`scratch`); keys past a row's own length are masked exactly as in an eager step over rows of different lengths
(weight exp(-huge) = 0), so a replay computes what the eager step computes, up to the order of floating-point
sums over the longer span. Graphs are captured on first use and share one memory pool (steps never overlap).
"""

from __future__ import annotations

import torch

from moss_speech.builders.llm.kv import SlotView, StaticKVCache
from moss_speech.builders.llm.model import MossSpeechForCausalLM


class GraphSlotView(SlotView):
    """The cache protocol over static device buffers: which slot each row uses and where its new token goes are
    filled in before every replay; the key span is fixed; lengths advance on the host, outside the graph."""

    def __init__(self, cache: StaticKVCache, index: torch.Tensor, start: torch.Tensor, span: int):
        self.cache = cache
        self.index = index
        self.start = start
        self.max_start = span - 1  # one new token per row: keys 0..span-1
        self.leading = False

    def advance(self, n: int) -> None:
        pass


class _Step:
    """One (batch bucket, key span) decode step over static buffers: captured as a CUDA graph, or, with
    `capture=False` (CPU tests of the bucketing), run eagerly on every call."""

    def __init__(self, model: MossSpeechForCausalLM, cache: StaticKVCache, batch: int, span: int, scratch: int, pool):
        device = cache.buffer.device
        # One int64 buffer per step, filled by one host-to-device copy: (text id, audio id, slot, start) per row.
        self.meta = torch.zeros(batch, 4, dtype=torch.long, device=device)
        self.meta[:, 2] = scratch  # warm-up and capture write only the scratch slot
        view = GraphSlotView(cache, self.meta[:, 2], self.meta[:, 3], span)
        self.run_eager = lambda: model(self.meta[:, None, :2], cache=view, last_only=True)
        self.graph: torch.cuda.CUDAGraph | None = None
        if pool is None:
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up off the capture: cuBLAS handles, allocator
                self.run_eager()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            text, audio = self.run_eager()
            self.text, self.audio = text.float(), audio.float()

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        with torch.no_grad():
            text, audio = self.run_eager()
        self.text, self.audio = text.float(), audio.float()


class DecodeGraphs:
    """Decode steps for one runtime's model and cache, keyed by (batch bucket, key span). `capture=False` runs
    the same padded steps eagerly (what the CPU tests check against the plain eager step)."""

    def __init__(
        self,
        model: MossSpeechForCausalLM,
        cache: StaticKVCache,
        max_slots: int,
        span_step: int = 256,
        capture: bool = True,
    ):
        self.model, self.cache = model, cache
        self.scratch = max_slots  # the cache holds one slot more than the runtime hands out
        self.buckets = sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self.span_step = span_step
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps: dict[tuple[int, int], _Step] = {}

    def decode(self, slots: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(slots)
        starts = self.cache.lengths[slots]
        bucket = next(n for n in self.buckets if n >= b)
        span = min(-(-(int(starts.max()) + 1) // self.span_step) * self.span_step, self.cache.max_len)
        key = (bucket, span)
        if key not in self.steps:
            self.steps[key] = _Step(self.model, self.cache, bucket, span, self.scratch, self.pool)
        step = self.steps[key]
        meta = torch.zeros(bucket, 4, dtype=torch.long)
        meta[:, 2] = self.scratch
        meta[:b, :2] = rows
        meta[:b, 2] = torch.tensor(slots)
        meta[:b, 3] = starts
        step.meta.copy_(meta)
        step.run()
        self.cache.lengths[slots] += 1
        return step.text[:b].cpu(), step.audio[:b].cpu()
