"""Length-grouped batches (``data.group_by_length``): rows of one modality and similar length together.

A random batch pads every row to its longest: with LLaVA-style data (30-token captions beside
1,500-token conversations) most of a batch can be padding. Like LLaVA's modality- and
length-grouped sampler, each epoch here
1. shuffles all rows (a generator seeded by (seed, epoch), so it is the same on every rank and
   after resume),
2. splits them, in that order, into the rows with an image and the text-only rows,
3. cuts each stream's whole batches into mega-batches of ``MEGABATCH`` batches, sorts each
   mega-batch by length (ties keep the shuffled order) and cuts it back into batches,
4. shuffles those batches of both streams together, and
5. puts the rows left over from each stream (fewer than a batch each) last, sorted by length, so an
   epoch has exactly as many batches as a random one and the short batch is the last.

The lengths are what a row occupies in the model's sequence, known without decoding an image: its
token ids plus the image tokens a model adds. Each batch is a whole batch over all ranks, split as
any batch is (``train.distributed.RankBatches``), so the sequence is the same on any number of ranks.
"""

from __future__ import annotations

import torch

from moevlm.data.dataset import EpochBatchSampler

# Batches per mega-batch: more groups lengths more tightly, fewer keeps batches more mixed from
# step to step. 16 cuts the padded share of the LLaVA-like mix of benchmarks/padding_share.py
# from 46 % to 4 % at 32 rows a batch (docs/configuration/index.md).
MEGABATCH = 16


def length_grouped_batches(lengths: list[int], has_image: list[bool], batch_size: int,
                           generator: torch.Generator, megabatch: int = MEGABATCH) -> list[list[int]]:
    """One epoch's batches of row indices (the last may be short); see the module docstring."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    grouped: list[list[int]] = []
    leftover: list[int] = []
    span = megabatch * batch_size
    for modality in (True, False):
        stream = [i for i in order if has_image[i] == modality]
        whole = len(stream) - len(stream) % batch_size
        leftover += stream[whole:]
        for start in range(0, whole, span):
            mega = sorted(stream[start:min(start + span, whole)], key=lambda i: -lengths[i])
            grouped += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    shuffled = [grouped[k] for k in torch.randperm(len(grouped), generator=generator).tolist()]
    leftover.sort(key=lambda i: -lengths[i])
    return shuffled + [leftover[j:j + batch_size] for j in range(0, len(leftover), batch_size)]


class LengthGroupedBatchSampler(EpochBatchSampler):
    """``EpochBatchSampler`` with length-grouped batches: the same length, position and resume rule."""

    def __init__(self, lengths: list[int], has_image: list[bool], batch_size: int, seed: int,
                 drop_last: bool = False, min_rows: int = 1, megabatch: int = MEGABATCH):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths but {len(has_image)} has_image flags")
        super().__init__(len(lengths), batch_size, seed, drop_last=drop_last, min_rows=min_rows)
        self.lengths, self.has_image, self.megabatch = list(lengths), list(has_image), megabatch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = length_grouped_batches(self.lengths, self.has_image, self.batch_size, generator, self.megabatch)
        return batches[:len(self)]  # drop_last leaves the short one out


def padded_share(batches: list[list[int]], lengths: list[int], ranks: int = 1) -> float:
    """Share of the padded sequence slots that are padding, each batch split over ``ranks`` as
    ``RankBatches`` splits it (each part padded to its own longest row)."""
    padding = slots = 0
    for rows in batches:
        size, extra = divmod(len(rows), ranks)
        start = 0
        for rank in range(ranks):
            part = rows[start:start + size + (rank < extra)]
            start += len(part)
            if part:
                longest = max(lengths[i] for i in part)
                slots += longest * len(part)
                padding += sum(longest - lengths[i] for i in part)
    return padding / slots if slots else 0.0
