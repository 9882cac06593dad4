"""``RunCheckpoints``: the last ``train.keep_checkpoints`` checkpoints of a run folder (and the
best one, ``best``), saving the next one, and the one ``--resume`` starts from.

    DIR/                           the newest checkpoint (what ``--checkpoint last`` reads)
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
import shutil
from pathlib import Path
from typing import Callable

import torch

from moevlm.checkpoint import (
    CONFIG,
    OPTIMIZER,
    SHARDED,
    SHARDED_METADATA,
    SNAPSHOT_NAME,
    SNAPSHOTS,
    STATE,
    WEIGHTS,
    PreparedModel,
    fsync_dir,
    load_training_checkpoint,
    snapshot_folder,
    write_checkpoint,
)
from moevlm.errors import CheckpointError, DamagedCheckpointError

log = logging.getLogger(__name__)



class RunCheckpoints:
    """The checkpoints of the run folder ``out_dir``; ``keep``: snapshots kept by ``save``;
    ``best``: the step of a snapshot ``save`` keeps too, however old (the trainer sets it)."""

    def __init__(self, out_dir: str | Path, keep: int = 3):
        self.out_dir, self.keep = Path(out_dir), keep
        self.best: int | None = None
        self.root = self.out_dir / SNAPSHOTS

    def snapshots(self) -> list[tuple[int, Path]]:
        """(step, folder) of the complete snapshots, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), path) for path in self.root.iterdir()
                 if path.is_dir() and (m := SNAPSHOT_NAME.fullmatch(path.name))]
        return sorted(found, reverse=True)

    def exists(self) -> bool:
        """Whether the folder holds a checkpoint (complete or not)."""
        return (self.out_dir / CONFIG).exists() or bool(self.snapshots())

    def latest(self) -> int | None:
        """The step of the newest snapshot, None before the first."""
        found = self.snapshots()
        return found[0][0] if found else None

    def _paths(self, step: int) -> tuple[Path, Path]:
        final = snapshot_folder(self.out_dir, step)
        return final, final.with_name(f".{final.name}.tmp")

    def _clear_stale(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step-*"):  # what an earlier kill left half written or half deleted
            shutil.rmtree(stale)

    def _commit(self, step: int, tmp: Path, final: Path, files: list[str]) -> None:
        """Rename the written ``tmp`` to ``step-N``, publish it as the folder's top level, keep the newest ``keep``
        and the best."""
        for later, folder in self.snapshots():
            # A resume set aside the damaged ones it passed over; any left from this step on (put
            # there by hand?) would count towards `keep` and push out the good ones, or block step-N.
            if later >= step:
                log.warning("%s is at or past step %d of this run: moved to %s", folder, step, _set_aside(folder))
        os.replace(tmp, final)
        fsync_dir(self.root)
        _publish(final, self.out_dir, files)
        for at, old in self.snapshots()[self.keep:]:
            if at != self.best:
                _discard(old)

    def save(self, prepared: PreparedModel, state: dict, optimizer: torch.optim.Optimizer, images=None) -> Path:
        """Write snapshot ``step-N`` of ``state["step"]``, make it the folder's top level, keep the newest ``keep``."""
        step = state["step"]
        final, tmp = self._paths(step)
        try:
            self._clear_stale()
            self._commit(step, tmp, final, write_checkpoint(tmp, prepared, state, optimizer, images))
        except OSError as err:
            raise CheckpointError(f"{self.out_dir}: cannot write checkpoint: {err.strerror or err}") from None
        return final

    def save_sharded(self, prepared: PreparedModel, state: dict, world, write_shards: Callable[[Path], list[str]],
                     pretrained_fingerprint: str | None, images=None) -> Path:
        """``save`` on several ranks, each calling it: ``write_shards(folder)`` (every rank) writes the
        weights and optimizer state; rank 0 the rest, then commits. A rank's failure stops every rank."""
        step = state["step"]
        final, tmp = self._paths(step)
        error = None
        if world.is_main:
            try:
                self._clear_stale()
                tmp.mkdir()
            except OSError as err:
                error = CheckpointError(f"{self.out_dir}: cannot write checkpoint: {err.strerror or err}")
        world.together(error)
        shards = write_shards(tmp)
        if world.is_main:
            try:
                files = write_checkpoint(tmp, prepared, state, images=images, shards=shards,
                                         pretrained_fingerprint=pretrained_fingerprint)
                self._commit(step, tmp, final, files)
            except OSError as err:
                error = CheckpointError(f"{self.out_dir}: cannot write checkpoint: {err.strerror or err}")
        world.together(error)
        return final

    def load(self, step: int | None = None) -> tuple[PreparedModel, dict, dict]:
        """The checkpoint to resume from, as ``load_training_checkpoint`` returns it: snapshot ``step``,
        or (None) the newest that passes its checksums.

        Falls back past damaged snapshots (a missing or corrupted file) with a warning naming each
        problem and the one used, and moves them aside; any other problem stops with its CheckpointError.
        """
        candidates = [folder for at, folder in self.snapshots() if step is None or at == step]
        if step is None and (self.out_dir / STATE).is_file():
            candidates.append(self.out_dir)
        if not candidates:
            which = "no checkpoint" if step is None else f"no snapshot of step {step}"
            raise CheckpointError(f"{self.out_dir}: nothing to resume ({which}); train without --resume first")
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
            for folder in damaged:  # snapshots only: the run folder itself is the last candidate
                try:
                    log.warning("damaged %s moved to %s", folder, _set_aside(folder))
                except OSError as err:
                    raise CheckpointError(f"{folder}: cannot move the damaged snapshot aside: "
                                          f"{err.strerror or err}") from None
            return loaded
        raise CheckpointError(f"{self.out_dir}: no checkpoint to resume from passed its checks "
                              f"(newest: {problems[0]})")


def _publish(snapshot: Path, out_dir: Path, files: list[str]) -> None:
    for name in files:  # checksums.json comes last
        target = out_dir / name
        target.parent.mkdir(exist_ok=True)  # sharded/
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(snapshot / name, tmp)  # files are never rewritten in place, so sharing is safe
        except OSError:
            shutil.copyfile(snapshot / name, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    # What the other kind of checkpoint left (a run resumed on another number of ranks): no longer
    # listed in checksums.json, so never read, but taking space.
    if SHARDED_METADATA in files:
        for name in (WEIGHTS, OPTIMIZER):
            (out_dir / name).unlink(missing_ok=True)
        for path in (out_dir / SHARDED).iterdir():
            if f"{SHARDED}/{path.name}" not in files:
                path.unlink()
    elif (out_dir / SHARDED).is_dir():
        shutil.rmtree(out_dir / SHARDED)
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
