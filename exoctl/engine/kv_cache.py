"""Per-sequence KV cache for the layers one runner holds."""

from __future__ import annotations

import torch

_CHUNK = 256  # capacity grows in steps of this many positions


class KVCache:
    """Keys and values of one sequence for layers [start, end), each [KVH, capacity, D].

    `length` counts the positions the whole model has seen; every layer of the range is
    appended once per forward, and the range's last layer advances `length`.
    """

    def __init__(self, layers: range, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.layers = layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.length = 0
        self.capacity = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def reserve(self, needed: int) -> None:
        """Room for `needed` positions in one allocation (a long prompt run in chunks would
        otherwise grow the cache by doubling, holding the old and the new copy at once)."""
        if needed > self.capacity:
            self._grow(-(-needed // _CHUNK) * _CHUNK)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self._grow(max(needed, 2 * self.capacity))

    def _grow(self, capacity: int) -> None:
        capacity = -(-capacity // _CHUNK) * _CHUNK
        for store in (self.keys, self.values):
            for layer in self.layers:
                grown = torch.empty(self.num_kv_heads, capacity, self.head_dim, dtype=self.dtype)
                if layer in store:
                    grown[:, : self.length] = store[layer][:, : self.length]
                store[layer] = grown
        self.capacity = capacity

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store k/v [T, KVH, D] of `layer`; return its keys/values so far [KVH, past + T, D] and past."""
        steps = k.shape[0]
        keys, values, past = self.slot(layer, steps)
        keys[:, past : past + steps] = k.transpose(0, 1)
        values[:, past : past + steps] = v.transpose(0, 1)
        return keys[:, : past + steps], values[:, : past + steps], past

    def slot(self, layer: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for `steps` new positions of `layer`, which the caller writes at [:, past : past +
        steps]: the layer's whole keys/values [KVH, capacity, D] and past."""
        past = self.length
        self._reserve(past + steps)
        if layer == self.layers[-1]:
            self.length = past + steps
        return self.keys[layer], self.values[layer], past

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (a rejected prefix, a retried step)."""
        self.length = min(self.length, length)

    def position_bytes(self) -> int:
        """What one position costs here: keys and values of every layer of the range."""
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def copy_prefix(self, positions: int, room: int = 0) -> KVCache:
        """A new cache holding copies of this one's first `positions` positions, with capacity for
        `room` more (so the step that follows does not grow it by doubling, copying it all again).
        The copy is the new sequence's own: appending to it never changes this cache."""
        if not 0 < positions <= self.length:
            raise ValueError(f"cannot copy {positions} positions of a cache holding {self.length}")
        copy = KVCache(self.layers, self.num_kv_heads, self.head_dim, self.dtype)
        copy._grow(positions + room)
        for source, target in ((self.keys, copy.keys), (self.values, copy.values)):
            for layer in self.layers:
                target[layer][:, :positions] = source[layer][:, :positions]
        copy.length = positions
        return copy

    def compacted(self, positions: int) -> KVCache:
        """This cache's first `positions` positions in tensors of exactly that size [KVH, positions,
        D] (a cached prefix is never appended to, and its bytes are what the budget counts)."""
        if not 0 < positions <= self.length:
            raise ValueError(f"cannot keep {positions} positions of a cache holding {self.length}")
        kept = KVCache(self.layers, self.num_kv_heads, self.head_dim, self.dtype)
        for source, target in ((self.keys, kept.keys), (self.values, kept.values)):
            for layer in self.layers:
                target[layer] = source[layer][:, :positions].clone()
        kept.length = kept.capacity = positions
        return kept
