"""The last ``train.keep_checkpoints`` checkpoints of a run, and the one ``--resume`` starts from.

    DIR/                           the newest checkpoint (what caption and eval read)
    DIR/checkpoints/step-00000500/ one complete checkpoint per kept step

A checkpoint is written into ``checkpoints/.step-N.tmp/`` and renamed to ``step-N`` as a
whole, so ``step-*`` folders are only ever complete (a kill -9 leaves a hidden temp folder,
cleared on the next save). Its files are then linked (copied where links are not possible)
into DIR one by one, checksums.json last: a crash in between leaves DIR's files out of step
with its checksums, which loading reports, while the snapshot stays intact. ``--resume``
takes the newest snapshot that passes its checksums, then DIR itself; the damaged snapshots it
passes over are renamed ``checkpoints/damaged-step-N/`` (kept, out of the count). Any other
problem loading a checkpoint stops the resume: an older snapshot would not fix it, and the saves
that follow would replace the newer ones.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from moevlm.config import Config
from moevlm.errors import CheckpointError
from moevlm.train.checkpoint import (
    CONFIG,
    STATE,
    Bundle,
    DamagedCheckpointError,
    fsync_dir,
    load_training_checkpoint,
    write_checkpoint,
)

log = logging.getLogger(__name__)

SNAPSHOTS = "checkpoints"
_NAME = re.compile(r"step-(\d+)")


def snapshots(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete snapshots, newest first."""
    root = Path(out_dir) / SNAPSHOTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (m := _NAME.fullmatch(path.name))]
    return sorted(found, reverse=True)


def has_checkpoint(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / CONFIG).exists() or bool(snapshots(out_dir))


def save_checkpoint(out_dir: Path, keep: int, model, tokenizer, config: Config, state: dict,
                    optimizer: torch.optim.Optimizer, untouched: set[str] = frozenset(), images=None) -> Path:
    """Write snapshot ``step-N`` of ``state["step"]``, make it DIR's top level, keep the newest ``keep``."""
    out_dir = Path(out_dir)
    root = out_dir / SNAPSHOTS
    step = state["step"]
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # what an earlier kill left half written or half deleted
            shutil.rmtree(stale)
        files = write_checkpoint(tmp, model, tokenizer, config, state, optimizer, untouched, images)
        for later, folder in snapshots(out_dir):
            # A resume set aside the damaged ones it passed over; any left from this step on (put
            # there by hand?) would count towards `keep` and push out the good ones, or block step-N.
            if later >= step:
                log.warning("%s is at or past step %d of this run: moved to %s", folder, step, _set_aside(folder))
        os.replace(tmp, final)
        fsync_dir(root)
        _publish(final, out_dir, files)
        for _, old in snapshots(out_dir)[keep:]:
            _discard(old)
    except OSError as err:
        raise CheckpointError(f"{out_dir}: cannot write checkpoint: {err.strerror or err}") from None
    return final


def _publish(snapshot: Path, out_dir: Path, files: list[str]) -> None:
    for name in files:  # checksums.json comes last
        tmp = out_dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(snapshot / name, tmp)  # files are never rewritten in place, so sharing is safe
        except OSError:
            shutil.copyfile(snapshot / name, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, out_dir / name)
    fsync_dir(out_dir)


def _set_aside(folder: Path) -> Path:
    """Rename a snapshot to damaged-step-N (or damaged-step-N.2, ...): out of the candidates, not deleted."""
    target, n = folder.with_name(f"damaged-{folder.name}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"damaged-{folder.name}.{n}")
    os.replace(folder, target)
    fsync_dir(folder.parent)
    return target


def _discard(folder: Path) -> None:
    """Take a snapshot out of the candidates in one rename, then delete it."""
    trash = folder.with_name(f".{folder.name}.old")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def load_for_resume(out_dir: Path) -> tuple[Bundle, dict, dict]:
    """The newest checkpoint of the run that passes its checksums, as ``load_training_checkpoint`` returns it.

    Falls back past damaged snapshots (a missing or corrupted file) with a warning naming each
    problem and the one used, and moves them aside; any other problem stops with its CheckpointError.
    """
    out_dir = Path(out_dir)
    candidates = [folder for _, folder in snapshots(out_dir)]
    if (out_dir / STATE).is_file():
        candidates.append(out_dir)
    if not candidates:
        raise CheckpointError(f"{out_dir}: nothing to resume (no checkpoint); train without --resume first")
    problems, damaged = [], []
    for folder in candidates:
        try:
            loaded = load_training_checkpoint(folder)
        except DamagedCheckpointError as err:
            log.warning("cannot resume from %s: %s", folder, err)
            problems.append(err)
            damaged.append(folder)
            continue
        if problems:
            log.warning("resuming from %s (step %s), the newest checkpoint that passed its checks",
                        folder, loaded[1].get("step"))
        for folder in damaged:  # snapshots only: DIR itself is the last candidate
            try:
                log.warning("damaged %s moved to %s", folder, _set_aside(folder))
            except OSError as err:
                raise CheckpointError(f"{folder}: cannot move the damaged snapshot aside: "
                                      f"{err.strerror or err}") from None
        return loaded
    raise CheckpointError(f"{out_dir}: no checkpoint to resume from passed its checks (newest: {problems[0]})")
