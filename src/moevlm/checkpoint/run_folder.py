"""Which folder of a run ``--checkpoint last|best|step-N`` names: a run folder's top level is its newest
checkpoint, and it keeps complete checkpoints of some steps in ``checkpoints/step-00000500/``
(train/snapshots.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from moevlm.checkpoint.folder import STATE
from moevlm.errors import CheckpointError

# A run folder keeps complete checkpoints of some steps in checkpoints/step-00000500/ (train/snapshots.py).
SNAPSHOTS = "checkpoints"
SNAPSHOT_NAME = re.compile(r"step-(\d+)")


def snapshot_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step-{step:08d}"


def resolve_checkpoint(folder: str | Path, which: str = "best") -> tuple[Path, str | None]:
    """The folder that ``--checkpoint which`` names in ``folder``, and a one-line note naming the
    step loaded when it is not the folder's last one (else None).

    ``last``: ``folder`` itself (a run folder's top level is its newest checkpoint). ``best``: the
    snapshot of the best validation its trainer_state.json records; ``folder`` itself when it records
    none or is no run folder (an export, a copy of one checkpoint). ``step-N``: that snapshot."""
    folder = Path(folder)
    match = SNAPSHOT_NAME.fullmatch(which)
    if which not in ("last", "best") and match is None:
        raise CheckpointError(f"--checkpoint {which}: must be last, best or step-N (e.g. step-500)")
    if which == "last":
        return folder, None
    state = _run_state(folder)
    if which == "best":
        step = (state.get("best") or {}).get("step")
        if step is None or not (folder / SNAPSHOTS).is_dir():
            return folder, None
    else:
        step = int(match.group(1))
    if step == state.get("step"):  # the top level is the last snapshot, published
        return folder, None
    snapshot = snapshot_folder(folder, step)
    if not snapshot.is_dir():
        steps = sorted(int(m.group(1)) for path in (folder / SNAPSHOTS).glob("step-*")
                       if (m := SNAPSHOT_NAME.fullmatch(path.name)))
        present = ", ".join(map(str, steps)) or "none"
        raise CheckpointError(f"{folder}: no snapshot of step {step} for --checkpoint {which} "
                              f"(snapshots of steps: {present})")
    return snapshot, f"loading {snapshot} (--checkpoint {which}: step {step}; the last is step {state.get('step')})"


def _run_state(folder: Path) -> dict:
    """The folder's trainer_state.json; {} where it has none (an export, a model without training)."""
    path = folder / STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
