"""Splitting, tokenizing, the in-memory dataset, collation and the resumable batch sampler.

The seed re-decoded base64 images on every batch, duplicated rows before splitting (so
validation saw training rows) and trained on padding. Here images are decoded once, the
split is made on images (all rows of a picture on one side), and labels are -100 everywhere
except answer tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from moevlm.data.augment import Augmentation
from moevlm.data.images import check_image, image_key, normalize, open_image
from moevlm.data.records import Sample, SkippedRows, clean_prompt
from moevlm.data.tokenizer import IGNORE_INDEX  # noqa: F401  (callers import it from here)
from moevlm.errors import DataError

log = logging.getLogger(__name__)


DUPLICATE = "duplicate row"  # the reason data.dedupe=drop counts dropped rows under


def drop_duplicates(samples: list[Sample]) -> tuple[list[Sample], SkippedRows]:
    """The rows without those whose image reference and turns repeat an earlier row (the first
    is kept), and the dropped ones counted as ``duplicate row``, each naming the row it repeats."""
    first: dict[tuple, Sample] = {}
    kept, dropped = [], SkippedRows()
    for sample in samples:
        key = (sample.image, tuple(sample.turns))
        if key in first:
            same = first[key]
            where = f"row {same.where}" if same.source == sample.source else f"{same.source} row {same.where}"
            dropped.add(sample.source, sample.where, f"{DUPLICATE}: same image and text as {where}")
            continue
        first[key] = sample
        kept.append(sample)
    return kept, dropped


def split_samples(samples: list[Sample], val_fraction: float,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic (train, val) split of the rows by image: val gets every row of
    floor(n_images * fraction) images, so a picture with several captions (COCO has five) is
    never scored on captions of it that were trained on. ``images.image_key`` says which
    references are the same image; text-only rows with the same turns count as one picture,
    so rows repeated in the data (``data.dedupe=keep``) never land on both sides. Both sides
    keep the rows' order."""
    group_of: dict[str, int] = {}  # image key -> its number, in order of first appearance
    groups = [group_of.setdefault(_split_key(s), len(group_of)) for s in samples]
    # The epsilon keeps 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996
    # at the counts a person would expect.
    num_val = math.floor(len(group_of) * val_fraction + 1e-9)
    order = torch.randperm(len(group_of), generator=torch.Generator().manual_seed(seed)).tolist()
    val_groups = set(order[:num_val])
    train = [s for s, group in zip(samples, groups) if group not in val_groups]
    val = [s for s, group in zip(samples, groups) if group in val_groups]
    return train, val


def _split_key(sample: Sample) -> str:
    if sample.image is None:
        return f"text-only:{sample.turns!r}"
    return image_key(sample.image)


def tokenizer_texts(samples: list[Sample]) -> list[str]:
    """The texts a char or bpe tokenizer is trained on: answers and prompts without the
    ``<image>`` placeholder (which is never tokenized as text)."""
    return [text for sample in samples for prompt, answer in sample.turns
            for text in (clean_prompt(prompt), answer) if text]


class ImageTextDataset(Dataset):
    """Rows tokenized up front; images decoded and prepared once into ``self.images``
    (N, C, S, S) uint8, or with ``preload=False`` checked up front (``images.check_image``)
    and decoded each time an item is read, for data sets larger than memory.

    ``prepare_image`` turns a PIL image into the model's uint8 (C, S, S) (see
    ``images.image_preparer``). An image that passes the check but still fails to decode
    gives an item ``{"bad": (file, row, problem), "index": i}``, which ``collate`` sets
    aside: an exception raised in a DataLoader worker would reach the user as a traceback.
    A file that is there but cannot be read (permissions, I/O) is not a bad row: it stops
    the run even with on_bad_row "skip" (its item is also marked ``"unreadable": True``).
    ``skipped`` counts the rows skipped here, by reason.

    A text-only row (``Sample.image`` None) is tokenized without image ids and its item holds
    a blank image with ``"has_image": False``, so every batch stacks alike; the model leaves
    the blank out.
    """

    def __init__(self, samples: list[Sample], tokenizer, prepare_image, max_text_len: int, *,
                 on_bad_row: str = "error", augment: Augmentation | None = None, seed: int = 0,
                 preload: bool = True):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be error or skip, not {on_bad_row!r}")
        self.on_bad_row, self.preload = on_bad_row, preload
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.prepare_image = prepare_image  # kept: a checkpoint saves it (its image processor)
        self._blank_image: torch.Tensor | None = None
        self.samples: list[Sample] = []
        self.skipped = SkippedRows()
        self._input_ids: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        images: list[torch.Tensor] = []
        # Rows often share an image (several captions or questions per picture); a failed
        # decode is remembered too, so every row with that image is reported the same way.
        decoded: dict[str, torch.Tensor | str] = {}
        for sample in samples:
            try:
                ids, labels = tokenizer.encode_conversation(sample.turns, max_text_len, image=sample.image is not None)
            except ValueError as err:
                self._bad(sample, str(err), on_bad_row)
                continue
            if sample.image is None:
                decoded[None] = self.blank_image() if preload else None
            elif sample.image not in decoded:
                try:
                    decoded[sample.image] = prepare_image(open_image(sample.image)) if preload else None
                    if not preload:
                        check_image(sample.image)
                except ValueError as err:
                    decoded[sample.image] = str(err)
                except OSError as err:
                    raise DataError(sample.source, sample.where, _unreadable(err)) from None
            image = decoded[sample.image]
            if isinstance(image, str):
                self._bad(sample, image, on_bad_row)
                continue
            self.samples.append(sample)
            if preload:
                images.append(image)
            # int32: half the memory of a few hundred thousand conversations; collate widens.
            self._input_ids.append(torch.tensor(ids, dtype=torch.int32))
            self._labels.append(torch.tensor(labels, dtype=torch.int32))
        if not self.samples:
            sources = ", ".join(sorted({s.source for s in samples})) or "data"
            raise DataError(sources, None, f"no usable rows (skipped {self.skipped})")
        self.images = torch.stack(images) if preload else None

    def _bad(self, sample: Sample, problem: str, on_bad_row: str) -> None:
        if on_bad_row == "error":
            raise DataError(sample.source, sample.where, problem)
        self.skipped.add(sample.source, sample.where, problem)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation of this epoch: it depends on (seed, epoch, row) only.

        DataLoader workers hold copies of the dataset taken when an iterator starts, so call
        this before iterating (and do not use persistent_workers with augmentation).
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def blank_image(self) -> torch.Tensor:
        """What a text-only row's item holds in place of an image: zeros of the prepared shape."""
        if self._blank_image is None:
            self._blank_image = torch.zeros_like(self.prepare_image(Image.new("RGB", (64, 64))))
        return self._blank_image

    def has_image(self, index: int) -> bool:
        return self.samples[index].image is not None

    def lengths(self, image_tokens: int) -> list[int]:
        """Each row's length in the model's sequence, no image decoded: its token ids plus
        ``image_tokens`` if it has an image (0 where the ids already hold the image's)."""
        return [len(ids) + image_tokens * self.has_image(i) for i, ids in enumerate(self._input_ids)]

    def image(self, index: int) -> torch.Tensor:
        """The prepared uint8 image of row ``index`` (blank for a text-only row); ValueError if it
        cannot be decoded, OSError if its file cannot be read."""
        if self.preload:
            return self.images[index]
        if not self.has_image(index):
            return self.blank_image()
        return self.prepare_image(open_image(self.samples[index].image))

    def images_of(self, rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        """uint8 images (n, C, S, S) of ``rows`` and the rows they belong to: a row whose image
        fails to decode raises its DataError, or is left out with on_bad_row "skip"."""
        images, kept = [], []
        for index in rows:
            try:
                images.append(self.image(index))
                kept.append(index)
            except ValueError as err:
                if self.on_bad_row == "error":
                    raise DataError(self.samples[index].source, self.samples[index].where, str(err)) from None
            except OSError as err:
                raise DataError(self.samples[index].source, self.samples[index].where, _unreadable(err)) from None
        return (torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)), kept

    def __getitem__(self, index: int) -> dict:
        try:
            image = self.image(index)
        except ValueError as err:
            sample = self.samples[index]
            return {"bad": (sample.source, sample.where, str(err)), "index": index}
        except OSError as err:
            sample = self.samples[index]
            return {"bad": (sample.source, sample.where, _unreadable(err)), "index": index, "unreadable": True}
        if self.augment is not None and self.has_image(index):
            image = self.augment(image, self.seed, self.epoch, index)
        return {"image": image, "input_ids": self._input_ids[index], "labels": self._labels[index],
                "index": index, "has_image": self.has_image(index)}


def _unreadable(err: OSError) -> str:
    name = f" {err.filename}" if err.filename else ""
    return f"cannot read image file{name}: {err.strerror or err}"


def collate(batch: list[dict], pad_id: int) -> dict:
    """Stack items into a batch: images normalized to [-1, 1], text right-padded, and
    ``has_image`` (B,) bool, False for text-only rows (their image is a blank).

    Items whose image failed to decode are left out and listed as (file, row, problem) under
    ``bad_rows``, or ``unreadable_rows`` when the file could not be read; a batch of only such
    items has nothing else (see ``usable_batch``)."""
    bad = {"bad_rows": [item["bad"] for item in batch if "bad" in item and not item.get("unreadable")],
           "unreadable_rows": [item["bad"] for item in batch if item.get("unreadable")]}
    batch = [item for item in batch if "bad" not in item]
    if not batch:
        return bad
    lengths = [len(item["input_ids"]) for item in batch]
    size = (len(batch), max(lengths))
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(size, dtype=torch.bool)
    for row, (item, length) in enumerate(zip(batch, lengths)):
        input_ids[row, :length] = item["input_ids"]
        labels[row, :length] = item["labels"]
        attention_mask[row, :length] = True
    return {"images": normalize(torch.stack([item["image"] for item in batch])),
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
            "has_image": torch.tensor([item.get("has_image", True) for item in batch], dtype=torch.bool)} | bad


def usable_batch(batch: dict, on_bad_row: str) -> dict | None:
    """The batch without its ``bad_rows`` (None when no row is left); with on_bad_row "error"
    the first bad row raises its DataError here, in the main process. An unreadable file
    raises whatever on_bad_row says; skipped rows are logged, counted by reason."""
    bad_rows, unreadable = batch.pop("bad_rows"), batch.pop("unreadable_rows")
    if unreadable:
        raise DataError(*unreadable[0])
    if bad_rows and on_bad_row == "error":
        raise DataError(*bad_rows[0])
    if bad_rows:
        skipped = SkippedRows()
        for bad in bad_rows:
            skipped.add(*bad)
        log.warning("skipped %s", skipped)
    return batch if "images" in batch else None


class EpochBatchSampler(Sampler):
    """Batches of indices, shuffled per epoch by seed + epoch, resumable at any batch.

    ``epoch`` and ``batch`` name the next batch this sampler will yield. Each ``__iter__``
    runs the rest of the current epoch (possibly nothing, after ``set_position(e, len(self))``)
    and leaves the position at the next epoch's start.
    A DataLoader with workers draws batches ahead of the training loop, so for resuming,
    record the position of the batches actually trained on (see ``__len__``), not these
    attributes at checkpoint time.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, drop_last: bool = False, min_rows: int = 1):
        """``min_rows``: an epoch's last, short batch is left out when it has fewer rows (training on
        several ranks: each rank needs one)."""
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples and batch_size >= 1, got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        # Dropping the only (short) batch would leave epochs with nothing in them.
        self.drop_last = (drop_last or 0 < num_samples % batch_size < min_rows) and num_samples >= batch_size
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_position(self, epoch: int, batch: int) -> None:
        if not (epoch >= 0 and 0 <= batch <= len(self)):
            raise ValueError(f"position epoch {epoch} batch {batch} is outside 0..{len(self)} batches")
        self.epoch, self.batch = epoch, batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in order: a function of (seed, epoch) only."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.batch
        batches = self.epoch_batches(epoch)
        last = len(self) - 1
        for b in range(start, len(self)):
            # Move the position before yielding, so it already names the next batch while
            # the caller works on this one.
            self.epoch, self.batch = (epoch + 1, 0) if b == last else (epoch, b + 1)
            yield batches[b]
        if start > last:  # resumed at the very end of an epoch: nothing left but to move on
            self.epoch, self.batch = epoch + 1, 0
