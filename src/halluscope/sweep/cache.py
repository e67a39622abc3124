"""Batched key/value caches for continuing many rows at once: per-row caches of different lengths packed
left-padded into buffers allocated once, so that each decode step writes in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["BufferedLayer", "pack_caches"]

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [1, kv_heads, length, head_dim]


class BufferedLayer(DynamicLayer):
    """A cache layer whose keys and values live in buffers allocated once for the whole decode: each step
    writes its positions in place instead of concatenating (which copies the whole cache every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers, self._length = (keys, values), length
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = (b[:, :, :self._length] for b in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        self.buffers[0][:, :, self._length:end] = key_states
        self.buffers[1][:, :, self._length:end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffers = tuple(b[indices] for b in self.buffers)
        self._expose()


def pack_caches(rows: Sequence[Sequence[KV]], extra: int) -> tuple[DynamicCache, torch.Tensor, int]:
    """One batched cache of per-row caches (one (keys, values) per layer each), left-padded to the longest,
    with room for `extra` more positions; returns it, the attention mask over the cached positions
    [rows, width] and the width."""
    lengths = [kv[0][0].shape[2] for kv in rows]
    width = max(lengths)
    cache = DynamicCache()
    for layer in range(len(rows[0])):
        first = rows[0][layer][0]
        keys, values = (first.new_empty(len(rows), first.shape[1], width + extra, first.shape[3]) for _ in range(2))
        for r, kv in enumerate(rows):
            pad = width - lengths[r]
            for buffer, data in zip((keys, values), kv[layer]):
                buffer[r, :, :pad] = 0  # masked, but must be finite: softmax weight 0 times NaN is NaN
                buffer[r, :, pad:width] = data[0]
        cache.layers.append(BufferedLayer(keys, values, width))
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0][0][0].device)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    return cache, mask, width
