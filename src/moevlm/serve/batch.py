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


def _kept_width(batch: DecodeBatch, rows: torch.Tensor) -> int:
    """Columns the given rows need: from the first one any of them owns to the end."""
    used = batch.key_mask.index_select(0, rows).any(0)
    return used.size(0) - int(used.nonzero()[0]) if bool(used.any()) else 0


def repack(model: VisionLanguageModel, parts: list[tuple[DecodeBatch, list[int]]], headroom: int) -> DecodeBatch | None:
    """A new batch holding the given rows of the given batches, in that order, with room for
    ``headroom`` more steps; None when no row is kept. Columns no kept row uses are dropped.

    Rows stay right-aligned, so each part moves as one block: a slice of its last columns, placed
    at the end of the new, wider (or narrower) cache."""
    parts = [(batch, torch.tensor(rows, device=batch.key_mask.device)) for batch, rows in parts if rows]
    if not parts:
        return None
    widths = [_kept_width(batch, rows) for batch, rows in parts]
    width, size = max(widths), sum(len(rows) for _, rows in parts)
    key_mask = torch.zeros(size, width, dtype=torch.bool, device=parts[0][0].key_mask.device)
    cache = model.new_cache(size, width + headroom)
    if isinstance(cache, KVCache):
        targets = [(cache.keys, cache.values)]  # all layers at once: (layers, B, heads, S, head_dim)
        cache.advance(width)
    else:
        first = parts[0][0].cache.layers
        targets = [(k.new_zeros(size, k.size(1), width, k.size(3)), v.new_zeros(size, v.size(1), width, v.size(3)))
                   for k, v in ((layer.keys, layer.values) for layer in first)]
    start = 0
    for (batch, rows), kept in zip(parts, widths):
        end, columns = start + len(rows), batch.key_mask.size(1)
        key_mask[start:end, width - kept:] = batch.key_mask.index_select(0, rows)[:, columns - kept:]
        if isinstance(cache, KVCache):
            sources = [(batch.cache.keys, batch.cache.values)]
        else:
            sources = [(layer.keys, layer.values) for layer in batch.cache.layers]
        for (keys, values), (source_keys, source_values) in zip(targets, sources):
            batch_dim = keys.dim() - 4  # 1 for the stacked scratch cache, 0 per transformers layer
            for target, source in ((keys, source_keys), (values, source_values)):
                block = source.narrow(-2, columns - kept, kept).index_select(batch_dim, rows)
                target.narrow(batch_dim, start, len(rows)).narrow(-2, width - kept, kept).copy_(block)
        start = end
    if not isinstance(cache, KVCache):
        for index, (keys, values) in enumerate(targets):
            cache.update(keys, values, index)
    return DecodeBatch(model, cache, key_mask)
