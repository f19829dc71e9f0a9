"""KV caches for every layer instance of the split model (shared block + text tail + audio tail).

Every cache implements the same calls the attention layers and the model use:
  offsets()                  -> LongTensor[B]: cache slot where each row's new tokens are written
  longest(batch)             -> int: the largest offset, known on the host (reading it from a GPU tensor would
                                stall the launch queue once per forward or, worse, once per layer)
  update(layer, k, v)        -> (keys, values) visible to this step, [B, kv_heads, S, head_dim]
  advance(n)                 after a forward of n new tokens
`ConcatKVCache` grows by concatenation (simple). `StackedKVCache` reads one stacked past tensor and keeps only
the new tokens' K/V: the exportable step's (`MossSpeechForCausalLM.step`, the ONNX graph's past_kv/new_kv).
`StaticKVCache` is preallocated once and written in place, rows may have different lengths —
what batched decode with requests joining and leaving needs.
"""

from __future__ import annotations

import torch


class ConcatKVCache:
    def __init__(self, num_layers: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = list(past) if past else [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.length, dtype=torch.long, device=device)

    def longest(self, batch: int) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def advance(self, n: int) -> None:  # lengths are implicit in the tensors
        pass


class StackedKVCache:
    """Cache protocol over a stacked past [L, 2, B, kv_heads, P, head_dim]; remembers only the new K/V."""

    def __init__(self, past_kv: torch.Tensor):
        self.past = past_kv
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.past.shape[4], dtype=torch.long, device=device)

    def longest(self, batch: int) -> int:
        return self.past.shape[4]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer] = (k, v)
        return torch.cat([self.past[layer, 0], k], dim=2), torch.cat([self.past[layer, 1], v], dim=2)

    def advance(self, n: int) -> None:  # the caller writes new_kv() where it keeps its cache
        pass

    def new_kv(self, num_layers: int) -> torch.Tensor:
        """[L, 2, B, kv_heads, T, head_dim]: the K/V every layer instance computed for the new rows."""
        return torch.stack([torch.stack(self.new[i]) for i in range(num_layers)])


class StaticKVCache:
    """One preallocated buffer [layers, 2, slots, kv_heads, max_len, head_dim] and a length per slot.

    Used directly, a forward runs on the first `active` slots; `view(slots)` runs one on any ordered set of slots
    (rows may have different lengths). Writes go in place; reads are views when the slots are the leading ones,
    so nothing is reallocated or concatenated per step. The lengths live on the host: a forward reads them
    without waiting for the GPU, and copies them to the device once.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.buffer = torch.zeros(num_layers, 2, slots, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # host
        self.max_len = max_len
        self.active = slots
        self._leading: SlotView | None = None  # the view the direct protocol uses during one forward

    def view(self, slots: list[int]) -> SlotView:
        return SlotView(self, list(slots))

    # The cache protocol over the leading `active` slots (one view per forward, dropped by `advance`).
    def _view(self, batch: int) -> SlotView:
        assert batch == self.active, f"forward batch {batch} != active slots {self.active}"
        if self._leading is None:
            self._leading = self.view(list(range(batch)))
        return self._leading

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        self._leading = None  # a forward starts here: read the lengths afresh
        return self._view(batch).offsets(batch, device)

    def longest(self, batch: int) -> int:
        return self._view(batch).longest(batch)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._view(k.shape[0]).update(layer, k, v)

    def advance(self, n: int) -> None:
        self._view(self.active).advance(n)
        self._leading = None


class SlotView:
    """The cache protocol of a `StaticKVCache` for an ordered set of its slots, for one forward: the slots'
    lengths are read once, on the host, when the view is made."""

    def __init__(self, cache: StaticKVCache, slots: list[int]):
        self.cache = cache
        self.slots = torch.tensor(slots, dtype=torch.long)
        start = cache.lengths[self.slots]
        self.max_start = int(start.max()) if slots else 0
        device = cache.buffer.device
        self.index = self.slots.to(device)
        self.start = start.to(device)
        self.leading = slots == list(range(len(slots)))

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        return self.start

    def longest(self, batch: int) -> int:
        return self.max_start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        b, _, t, _ = k.shape
        end = self.max_start + t
        if end > c.max_len:
            raise ValueError(f"KV cache holds {c.max_len} tokens per sequence; this step needs {end}")
        pos = self.start[:, None] + torch.arange(t, device=k.device)  # [B, T]
        rows = self.index[:, None].expand(b, t)
        layer_kv = c.buffer[layer]
        # index_put on [slot, pos] with heads/dims as trailing slices: writes in place, one row per sequence.
        layer_kv[0].transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(layer_kv.dtype)
        layer_kv[1].transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(layer_kv.dtype)
        if self.leading:
            return layer_kv[0, :b, :, :end], layer_kv[1, :b, :, :end]
        return layer_kv[0, self.index, :, :end], layer_kv[1, self.index, :, :end]

    def advance(self, n: int) -> None:
        self.cache.lengths[self.slots] += n
