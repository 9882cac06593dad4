"""From ``--data`` (and ``--val-data``) to what training needs, in one call: the rows read, the
validation rows held out (by image, data/dataset.py), a tokenizer trained on the training rows when
the model has none yet, and the two datasets. Rows made on the fly instead of read from a file
(``moevlm demo``'s scenes) come from a ``GeneratedData``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from moevlm.config import Config
from moevlm.data.augment import Augmentation
from moevlm.data.dataset import ImageTextDataset, drop_duplicates, split_samples, tokenizer_texts
from moevlm.data.images import image_preparer
from moevlm.data.records import Sample, SkippedRows
from moevlm.data.sources import read_data
from moevlm.data.summary import DataSummary
from moevlm.data.tokenizer import Tokenizer
from moevlm.data.tokenizer_factory import TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train_set: ImageTextDataset
    val_set: ImageTextDataset | None
    tokenizer: TextTokenizer
    skipped: SkippedRows  # rows skipped with data.on_bad_row=skip, by reason
    summary: DataSummary | None = None  # None: every row was used (generated data)

    def __post_init__(self):
        if self.summary is None:
            val_rows = len(self.val_set) if self.val_set is not None else 0
            self.summary = DataSummary(len(self.train_set) + val_rows, len(self.train_set), val_rows)


class GeneratedData(Protocol):
    """Training data made on the fly, in place of a ``--data`` file."""

    def load(self, config: Config, val_data: Path | None, tokenizer: TextTokenizer | None,
             folder: Path | None) -> TrainingData:
        """What ``load_training_data`` returns, with the same arguments."""


def dataset_for(samples: list[Sample], tokenizer: TextTokenizer, config: Config, augment: Augmentation | None,
                folder: Path | None = None) -> ImageTextDataset:
    """``folder``: a checkpoint whose image processor to use (else the vision tower's source)."""
    return ImageTextDataset(samples, tokenizer, image_preparer(config.model, folder), config.model.decoder.max_text_len,
                            on_bad_row=config.data.on_bad_row, augment=augment, seed=config.train.seed,
                            preload=config.data.preload)


def new_tokenizer(config: Config, samples: list[Sample]) -> TextTokenizer:
    """A model's first tokenizer: the pretrained LM's own, or char/BPE trained on ``samples``."""
    if config.model.tokenizer.kind == "hf":
        return load_tokenizer(None, config.model)  # from decoder.pretrained
    return Tokenizer.train(tokenizer_texts(samples), config.model.tokenizer.kind, config.model.tokenizer.vocab_size)


def load_training_data(config: Config, data: Path | GeneratedData, val_data: Path | None = None,
                       tokenizer: TextTokenizer | None = None, folder: Path | None = None) -> TrainingData:
    """Read and split the data and build the datasets. ``tokenizer`` None: a new one (``new_tokenizer``);
    ``folder``: a checkpoint whose image processor the datasets use."""
    if not isinstance(data, (str, os.PathLike)):
        return data.load(config, val_data, tokenizer, folder)
    samples, skipped = read_data(data, config.data, config.data.max_rows)
    rows_read = len(samples) + len(skipped)
    samples, dropped = _dedupe(samples, config.data.dedupe)
    if val_data is not None:
        train_samples = samples
        val_samples, val_skipped = read_data(val_data, config.data, config.data.max_rows)
        rows_read += len(val_samples) + len(val_skipped)
        skipped.update(val_skipped)
        val_samples, val_dropped = _dedupe(val_samples, config.data.dedupe)
        dropped.update(val_dropped)
    else:
        train_samples, val_samples = split_samples(samples, config.data.val_fraction, config.train.seed)
    tokenizer = tokenizer or new_tokenizer(config, train_samples)
    train_set = dataset_for(train_samples, tokenizer, config, Augmentation.from_config(config.data), folder)
    val_set = dataset_for(val_samples, tokenizer, config, None, folder) if val_samples else None
    skipped.update(train_set.skipped)
    if val_set is not None:
        skipped.update(val_set.skipped)
    if skipped:
        log.warning("data.on_bad_row=skip: skipped %s", skipped)
    dropped.update(skipped)
    summary = DataSummary(rows_read, len(train_set), len(val_set) if val_set is not None else 0, dropped)
    return TrainingData(train_set, val_set, tokenizer, skipped, summary)


def _dedupe(samples: list[Sample], dedupe: str) -> tuple[list[Sample], SkippedRows]:
    """``data.dedupe``: drop repeated rows (counted), or keep them (the split keeps them together)."""
    return drop_duplicates(samples) if dedupe == "drop" else (samples, SkippedRows())
