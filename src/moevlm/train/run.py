"""``moevlm train``: reads the data, splits it, builds or restores tokenizer and model, trains."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moevlm.config import Config
from moevlm.data.dataset import ImageTextDataset, split_samples, unique_samples
from moevlm.data.records import Sample, read_samples
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import MoevlmError
from moevlm.models.vlm import VLM
from moevlm.train.snapshots import has_checkpoint, load_for_resume
from moevlm.train.tracking import Tracker
from moevlm.train.trainer import Trainer

log = logging.getLogger(__name__)


def _texts(samples: list[Sample]) -> list[str]:
    return [text for sample in samples for turn in sample.turns for text in turn if text]


def dataset_for(samples: list[Sample], tokenizer: Tokenizer, config: Config, augment: bool) -> ImageTextDataset:
    vision = config.model.vision
    return ImageTextDataset(samples, tokenizer, vision.image_size, vision.channels,
                            config.model.decoder.max_text_len, on_bad_row=config.data.on_bad_row,
                            augment=augment, seed=config.train.seed)


def run_training(config: Config, data: Path, out: Path, val_data: Path | None = None, resume: bool = False,
                 max_steps: int | None = None, tracking_uri: str | None = None, tracking: bool = True,
                 progress: bool = True) -> tuple[Trainer, dict]:
    out = Path(out)
    state = optimizer_state = None
    if resume:
        model, tokenizer, config, state, optimizer_state = load_for_resume(out)
    elif has_checkpoint(out):
        raise MoevlmError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if max_steps is not None:
        config.train.max_steps = max_steps

    samples, skipped = read_samples(data, config.data.on_bad_row, config.data.max_rows)
    if val_data is not None:
        train_samples = unique_samples(samples)
        val_samples, val_skipped = read_samples(val_data, config.data.on_bad_row, config.data.max_rows)
        skipped += val_skipped
    else:
        train_samples, val_samples = split_samples(samples, config.data.val_fraction, config.train.seed)
    if not resume:
        tokenizer = Tokenizer.train(_texts(train_samples), config.model.tokenizer.kind,
                                    config.model.tokenizer.vocab_size)
        config.model.decoder.vocab_size = tokenizer.vocab_size
        torch.manual_seed(config.train.seed)  # initial weights, then router noise and dropout
        model = VLM(config.model)
    train_set = dataset_for(train_samples, tokenizer, config, config.data.augment)
    val_set = dataset_for(val_samples, tokenizer, config, False) if val_samples else None
    skipped += train_set.skipped + (val_set.skipped if val_set else 0)
    if skipped:
        log.warning("skipped %d bad rows (data.on_bad_row=skip)", skipped)

    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(out, tracking_uri, enabled=tracking, run_id=(state or {}).get("mlflow_run_id"))
    if not resume:
        params = config.to_dict()
        params["data"].update(train_file=str(data), val_file=str(val_data or ""), train_rows=len(train_set),
                              val_rows=len(val_set) if val_set else 0, skipped_rows=skipped)
        tracker.log_params(params)
    trainer = Trainer(config, model, tokenizer, train_set, val_set, out, tracker, state, optimizer_state,
                      progress=progress)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return trainer, result
