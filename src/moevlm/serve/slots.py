"""The running batch of a compiled server (``moevlm serve`` without ``--no-compile``): a table of
slots over the static buffers of the model's compiled decoding step (moevlm.compiled), so that step
only ever sees the shapes it was compiled for.

The running rows fill slots 0..n-1 of the smallest batch bucket that holds them (1, 2, 4, ... up to
``--max-batch`` rounded up); the slots beyond are padding, their key mask False but for the column
each step writes, so they compute finite values nobody reads. The cache has one length for the
whole server (``length``), so a server compiles one graph per batch bucket, all at start (``warm``).

When rows join (prefilled eagerly, together, into an ordinary cache) or leave, ``pack`` writes the
kept rows' keys and values into the buffers of the bucket they now need: each row's own columns
packed together, right-aligned at one shared slot, a key mask True on them alone. Positions come
from the key mask (the count of a row's real tokens) and every key carries its position already, so
where its columns lie never changes a row's logits, as in the eager engine's re-pack (serve/batch.py).
"""

from __future__ import annotations

import logging
import time

import torch

from moevlm.compiled import MIN_LENGTH, CompiledDecoder, StaticBuffers, bucket

log = logging.getLogger("moevlm.serve")


def layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer, each (batch, heads, columns, head_dim), of any cache the models
    hand out: ``KVCache`` and ``StaticKVCache`` (keys per layer), transformers' caches (``layers``)
    and ``StaticLMCache`` (a transformers ``StaticCache`` inside)."""
    cache = getattr(cache, "cache", cache)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.keys, cache.values))


class SlotTable:
    """The compiled decoder's buffers for the bucket in use; ``cache`` and ``key_mask`` (bucket,
    length) are theirs, so a table is also a part that ``pack`` takes rows from."""

    def __init__(self, decoder: CompiledDecoder, max_batch: int, length: int):
        self.decoder, self.length = decoder, bucket(length, MIN_LENGTH)
        self.sizes = [1 << i for i in range(bucket(max_batch).bit_length())]
        self.buffers: StaticBuffers | None = None
        self.rows = self.slot = 0

    @property
    def cache(self):
        return self.buffers.cache

    @property
    def key_mask(self) -> torch.Tensor:
        return self.buffers.key_mask

    def warm(self) -> None:
        """Compiles the step of every batch bucket now (a dummy prefill first: transformers' static
        cache takes its batch from it); logs one line with the time it took."""
        began = time.perf_counter()
        for size in self.sizes:
            buffers = self.decoder.buffers_for(size, self.length)
            ids = torch.zeros(size, 1, dtype=torch.long, device=self.decoder.device)
            self.decoder.model.prefill(None, ids, torch.ones_like(ids), buffers.cache)
            buffers.key_mask.zero_()
            buffers.key_mask[:, 0] = True
            self.decoder.run(buffers)
        how = "eagerly (not compiled)" if self.decoder.eager_reason else "compiled"
        log.info("decoding step %s for batch sizes %s at cache length %d in %.1f s", how,
                 ",".join(map(str, self.sizes)), self.length, time.perf_counter() - began)

    def pack(self, parts: list[tuple[object, list[int]]]) -> SlotTable | None:
        """The given rows of the given parts (this table, or a prefilled ``DecodeBatch``: anything with
        ``cache`` and ``key_mask``), in that order, as this table's rows; None when no row is kept.
        Every row's columns must fit in ``length`` with one to spare (the engine sends longer
        requests to the eager path)."""
        rows = []  # per kept row: (keys, values) per layer, its own columns only (heads, n, head_dim)
        for part, indices in parts:
            layers = layers_of(part.cache)
            for index in indices:
                columns = part.key_mask[index].nonzero().squeeze(1)
                rows.append([(keys[index].index_select(1, columns), values[index].index_select(1, columns))
                             for keys, values in layers])
        self.rows = len(rows)
        if not rows:
            return None
        self.slot = max(row[0][0].size(1) for row in rows)
        assert self.slot < self.length, f"a row of {self.slot} columns left no room in {self.length}"
        self.buffers = self.decoder.buffers_for(bucket(len(rows)), self.length)
        key_mask = self.buffers.key_mask
        key_mask.zero_()
        for layer, (keys, values) in enumerate(layers_of(self.buffers.cache)):
            keys.zero_()
            values.zero_()
            for index, row in enumerate(rows):
                row_keys, row_values = row[layer]
                width = row_keys.size(1)
                keys[index, :, self.slot - width:self.slot] = row_keys
                values[index, :, self.slot - width:self.slot] = row_values
        for index, row in enumerate(rows):
            key_mask[index, self.slot - row[0][0].size(1):self.slot] = True
        self.buffers.cache.slot.fill_(self.slot)
        for layer in getattr(getattr(self.buffers.cache, "cache", None), "layers", []):
            layer.cumulative_length.fill_(self.slot)  # where transformers' static layers write next
        return self

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row (rows,); returns the next-token logits (rows, V). The shared slot
        stays the longest row's column count, so it reaches ``length`` only past that row's need."""
        self.buffers.tokens[:self.rows] = tokens
        logits = self.decoder.run(self.buffers)[:self.rows]
        self.slot += 1
        return logits
