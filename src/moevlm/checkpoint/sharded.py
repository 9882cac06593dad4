"""A checkpoint that several ranks wrote (``sharded/``: ``torch.distributed.checkpoint`` shards of the
weights and optimizer state, train/dist_checkpoint.py), read in one process: inference never needs
``torch.distributed``'s process group."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moevlm.checkpoint.folder import SHARDED


@dataclass
class ShardedOptimizerState:
    """The optimizer state of a sharded checkpoint: read once the run's optimizer exists."""
    folder: Path


def read_sharded_weights(model_dir: Path, model) -> dict[str, torch.Tensor]:
    """The whole tensors of a sharded checkpoint that ``model`` has, read in this process."""
    import torch.distributed.checkpoint as dcp  # Lazy: 0.7 s to import; only sharded checkpoints need it

    reader = dcp.FileSystemReader(str(model_dir / SHARDED))
    stored = {key.removeprefix("model.") for key in reader.read_metadata().state_dict_metadata
              if key.startswith("model.")}
    state = {name: torch.empty_like(tensor) for name, tensor in model.state_dict().items() if name in stored}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        # Each process reads whole tensors on its own (ranks resuming read in turn, see train/run.py).
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state
