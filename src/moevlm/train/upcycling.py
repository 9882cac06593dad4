"""``moevlm upcycle``: a checkpoint's dense FFNs turned into MoE layers (models/upcycle.py), written
as a new checkpoint folder in one rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from moevlm.checkpoint import PreparedModel, write_checkpoint
from moevlm.config import Config
from moevlm.data.images import image_preparer
from moevlm.errors import ConfigError
from moevlm.models.upcycle import upcycle
from moevlm.train.stages import load_merged


def layer_spec(text: str) -> str | list[int]:
    """``--layers``: all, every-other, or a comma-separated list of layer indices."""
    if text in ("all", "every-other"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected all, every-other or a list like 0,2,5") from None


# Written into the temporary folder first: only a folder that carries it is ours to delete.
_PARTIAL = ".moevlm-partial"


def upcycle_checkpoint(model_dir: Path, out_dir: Path, experts: int, top_k: int, layers) -> Config:
    """``moevlm upcycle``: the checkpoint in ``model_dir`` with its dense FFNs in ``layers`` turned
    into MoE layers, written to the new folder ``out_dir`` in one rename. Returns its config."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir}: already exists and is not an empty folder")
    prepared = load_merged(model_dir)
    model, config = upcycle(prepared.model, prepared.config, experts, top_k, layers)
    from_source = prepared.from_source & set(model.state_dict())
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        if not (tmp / _PARTIAL).is_file():
            raise ConfigError(f"--out {out_dir}: {tmp} is in the way and moevlm did not make it; move it or "
                              "choose another --out")
        shutil.rmtree(tmp)  # what an interrupted upcycle left
    tmp.mkdir(parents=True)
    (tmp / _PARTIAL).touch()
    write_checkpoint(tmp, PreparedModel(model, prepared.tokenizer, config, from_source),
                     images=image_preparer(config.model, model_dir))
    os.replace(tmp, out_dir)
    (out_dir / _PARTIAL).unlink()
    return config
