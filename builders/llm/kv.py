"""KV caches for every layer instance of the split model (shared block + text tail + audio tail).

Both caches implement the same three calls the attention layers and the model use:
  offsets()                  -> LongTensor[B]: cache slot where each row's new tokens are written
  update(layer, k, v)        -> (keys, values) visible to this step, [B, kv_heads, S, head_dim]
  advance(n)                 after a forward of n new tokens
`ConcatKVCache` grows by concatenation (simple; it is also the shape of the ONNX graph's past/present
tensors). `StaticKVCache` is preallocated once and written in place, rows may have different lengths —
what batched decode with requests joining and leaving needs.
"""

from __future__ import annotations

import torch


class ConcatKVCache:
    def __init__(self, num_layers: int, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = list(past) if past else [None] * num_layers
        self._updated: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.length, dtype=torch.long, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def advance(self, n: int) -> None:  # lengths are implicit in the tensors
        pass


class StaticKVCache:
    """One preallocated buffer [layers, 2, slots, kv_heads, max_len, head_dim] and a length per slot.

    A forward runs on the first `active` slots (callers keep live sequences packed at the front, see
    `move_slot`), so every read is a view: nothing is reallocated or concatenated per step.
    """

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.buffer = torch.zeros(num_layers, 2, slots, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.active = slots
        self._pending = 0

    @property
    def slots(self) -> int:
        return self.buffer.shape[2]

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        assert batch == self.active, f"forward batch {batch} != active slots {self.active}"
        return self.lengths[:batch]

    def span(self, new_tokens: int) -> int:
        """Key slots a forward of `new_tokens` reads: up to the longest active row after writing."""
        return int(self.lengths[: self.active].max()) + new_tokens

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, t, _ = k.shape
        start = self.lengths[:b]
        end = int(start.max()) + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens per sequence; this step needs {end}")
        pos = start[:, None] + torch.arange(t, device=k.device)  # [B, T]
        rows = torch.arange(b, device=k.device)[:, None].expand(b, t)
        layer_kv = self.buffer[layer]
        # index_put on [slot, pos] with heads/dims as trailing slices: writes in place, one row per sequence.
        layer_kv[0].transpose(1, 2)[rows, pos] = k.transpose(1, 2).to(layer_kv.dtype)
        layer_kv[1].transpose(1, 2)[rows, pos] = v.transpose(1, 2).to(layer_kv.dtype)
        self._pending = t
        return layer_kv[0, :b, :, :end], layer_kv[1, :b, :, :end]

    def advance(self, n: int) -> None:
        self.lengths[: self.active] += n

    def reset_slot(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        """Copy one sequence's cache to another slot (to keep live sequences packed at the front)."""
        n = int(self.lengths[src])
        self.buffer[:, :, dst, :, :n] = self.buffer[:, :, src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0
