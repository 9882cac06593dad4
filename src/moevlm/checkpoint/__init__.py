"""Checkpoints: one folder per checkpoint (docs/checkpoints.md), written once, verified before loading.

``folder``: the files of a checkpoint folder, writing one and verifying its checksums; ``loading``:
``load_model`` (inference: model, tokenizer, config), ``load_checkpoint`` (the same as a
``PreparedModel``, which also names the weights read from a source) and ``load_training_checkpoint``
(plus the trainer and optimizer state, for ``--resume``); ``sharded``: the weights several ranks wrote
as ``torch.distributed.checkpoint`` shards, read in one process; ``run_folder``: which folder of a run
``--checkpoint last|best|step-N`` names (``resolve_checkpoint``). Keeping a run's checkpoints and
choosing one to resume from is ``moevlm.train.snapshots.RunCheckpoints``.
"""

from moevlm.checkpoint.folder import (
    CHECKSUMS,
    CONFIG,
    MODEL_FILES,
    OPTIMIZER,
    PRETRAINED,
    SHARDED,
    SHARDED_METADATA,
    STATE,
    TOKENIZER,
    TRAINING_FILES,
    VERSION_KEY,
    WEIGHTS,
    PreparedModel,
    fingerprint,
    fsync_dir,
    is_sharded,
    sha256,
    tied_copies,
    verify_checkpoint,
    with_tied,
    write_checkpoint,
)
from moevlm.checkpoint.loading import (
    is_transformers_llava,
    load_checkpoint,
    load_model,
    load_training_checkpoint,
    read_config,
)
from moevlm.checkpoint.run_folder import SNAPSHOT_NAME, SNAPSHOTS, resolve_checkpoint, snapshot_folder
from moevlm.checkpoint.sharded import ShardedOptimizerState

__all__ = [
    "CHECKSUMS", "CONFIG", "MODEL_FILES", "OPTIMIZER", "PRETRAINED", "SHARDED", "SHARDED_METADATA", "SNAPSHOTS",
    "SNAPSHOT_NAME", "STATE", "TOKENIZER", "TRAINING_FILES", "VERSION_KEY", "WEIGHTS", "PreparedModel",
    "ShardedOptimizerState", "fingerprint", "fsync_dir", "is_sharded", "is_transformers_llava", "load_checkpoint",
    "load_model", "load_training_checkpoint", "read_config", "resolve_checkpoint", "sha256", "snapshot_folder",
    "tied_copies", "verify_checkpoint", "with_tied", "write_checkpoint",
]
