"""The running decode batch: one KV cache for every active request, re-packed when requests join or leave.

Each row keeps its keys and values right-aligned, with a key mask that is False on the columns it
does not own (left padding, and for a scratch model the padding between its image and text tokens,
as ``generate`` lays a batch out). Positions come from the key mask, never from the column, so a row
computes the same logits whatever padding the other rows force on it: greedy output does not depend
on the batch. Between joins and leaves the cache only grows by one column per step; a join or a
leave rebuilds it (a copy of the cache), which is cheap next to the decoding steps in between.

Works on both caches the models hand out: the scratch ``KVCache`` (preallocated, one shared length)
and transformers' ``DynamicCache`` (per-layer tensors that grow).
"""

from __future__ import annotations

import torch

from moevlm.models.attention import KVCache
from moevlm.models.protocol import VisionLanguageModel


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, keys and values (B, heads, S, head_dim) of the positions written so far."""
    if isinstance(cache, KVCache):
        return [(cache.keys[layer, :, :, :cache.length], cache.values[layer, :, :, :cache.length])
                for layer in range(cache.keys.size(0))]
    return [(layer.keys, layer.values) for layer in cache.layers]


def _build_cache(model: VisionLanguageModel, layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int):
    batch, length = layers[0][0].size(0), layers[0][0].size(2)
    cache = model.new_cache(batch, capacity)
    if isinstance(cache, KVCache):
        for index, (keys, values) in enumerate(layers):
            cache.keys[index, :, :, :length].copy_(keys)
            cache.values[index, :, :, :length].copy_(values)
        cache.advance(length)
    else:
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
    return cache


class DecodeBatch:
    """Rows of requests decoding together: their cache and key mask (B, S)."""

    def __init__(self, model: VisionLanguageModel, cache, key_mask: torch.Tensor):
        self.model, self.cache, self.key_mask = model, cache, key_mask

    @property
    def size(self) -> int:
        return self.key_mask.size(0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (B,); returns the next-token logits (B, V)."""
        self.key_mask = torch.cat([self.key_mask, torch.ones_like(self.key_mask[:, :1])], dim=1)
        return self.model.step(tokens, self.key_mask, self.cache)


def repack(model: VisionLanguageModel, parts: list[tuple[DecodeBatch, list[int]]], headroom: int) -> DecodeBatch | None:
    """A new batch holding the given rows of the given batches, in that order, with room for
    ``headroom`` more steps; None when no row is kept. Columns no kept row uses are dropped."""
    rows = []  # (keys/values per layer, key mask) of one row, trimmed to the columns it owns
    for batch, indices in parts:
        layers = _layers(batch.cache)
        for index in indices:
            mask = batch.key_mask[index]
            first = int(mask.nonzero()[0]) if bool(mask.any()) else mask.size(0)
            rows.append(([(k[index, :, first:], v[index, :, first:]) for k, v in layers], mask[first:]))
    if not rows:
        return None
    width = max(mask.size(0) for _, mask in rows)
    key_mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0][1].device)
    packed = []
    for layer in range(len(rows[0][0])):
        keys, values = rows[0][0][layer]
        shape = (len(rows), keys.size(0), width, keys.size(2))
        packed.append((keys.new_zeros(shape), values.new_zeros(shape)))
    for row, (layers, mask) in enumerate(rows):
        start = width - mask.size(0)
        key_mask[row, start:] = mask
        for (all_keys, all_values), (keys, values) in zip(packed, layers):
            all_keys[row, :, start:] = keys
            all_values[row, :, start:] = values
    return DecodeBatch(model, _build_cache(model, packed, width + headroom), key_mask)
