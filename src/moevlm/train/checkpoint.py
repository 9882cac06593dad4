"""One checkpoint folder (design.md §2): config.json, model.safetensors, tokenizer.json,
trainer_state.json, optimizer.pt, and checksums.json (the sha256 of each of them).

checksums.json is written last and checked before anything is loaded, so a folder cut off
while being written, a truncated copy or a flipped bit is reported with the file's name
instead of being loaded. Weights are safetensors and the optimizer state is read with
``weights_only=True``: loading never runs pickled code. Keeping several checkpoints and
choosing one to resume from is ``moevlm.train.snapshots``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moevlm.config import Config
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import CheckpointError, ConfigError, MoevlmError
from moevlm.models.vlm import VLM

CONFIG, WEIGHTS, TOKENIZER, STATE, OPTIMIZER, CHECKSUMS = (
    "config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt", "checksums.json")
MODEL_FILES = (CONFIG, WEIGHTS, TOKENIZER)
TRAINING_FILES = MODEL_FILES + (STATE, OPTIMIZER)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable: a rename lives in the folder, not in the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _state_dict_for_saving(model: VLM) -> dict[str, torch.Tensor]:
    # The LM head shares its tensor with the token embedding; safetensors refuses shared
    # storage, so the tied copy is dropped and re-tied by the constructor on load.
    state = model.state_dict()
    if model.cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight")
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def write_checkpoint(folder: Path, model: VLM, tokenizer: Tokenizer, config: Config,
                     state: dict | None = None, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Write a checkpoint into ``folder`` (a fresh, private folder: files are written in place).

    Returns the names written, checksums.json last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {
        CONFIG: lambda path: path.write_text(config.to_json()),
        TOKENIZER: tokenizer.save,
        WEIGHTS: lambda path: save_file(_state_dict_for_saving(model), str(path),
                                        metadata={"format": "pt", "step": str((state or {}).get("step", 0))}),
    }
    if optimizer is not None:
        writers[OPTIMIZER] = lambda path: torch.save(optimizer.state_dict(), path)
    if state is not None:
        writers[STATE] = lambda path: path.write_text(json.dumps(state))
    sums = {}
    for name, write in writers.items():
        write(folder / name)
        _fsync_file(folder / name)
        sums[name] = sha256(folder / name)
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1))
    _fsync_file(folder / CHECKSUMS)
    fsync_dir(folder)
    return list(writers) + [CHECKSUMS]


def verify_checkpoint(folder: Path, required: tuple[str, ...] = MODEL_FILES) -> None:
    """Check that ``required`` files are there and match checksums.json; else CheckpointError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: not a complete moevlm checkpoint ({missing[0]} is missing)")
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: {CHECKSUMS} is missing (a checkpoint cut off while being written, "
                              "or one from a moevlm without checksums)")
    try:
        sums = json.loads(manifest.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest}: damaged (not the JSON moevlm writes)") from None
    for name in required:
        if name not in sums:
            raise CheckpointError(f"{folder}: {name} is not listed in {CHECKSUMS} (incomplete checkpoint)")
        if sha256(folder / name) != sums[name]:
            raise CheckpointError(f"{folder / name}: checksum mismatch (the file is corrupted, truncated "
                                  "or from another checkpoint)")


def load_config_file(model_dir: Path) -> Config:
    path = Path(model_dir) / CONFIG
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[VLM, Tokenizer, Config]:
    """Verify the checksums, then rebuild the model from config.json and load weights and tokenizer."""
    model_dir = Path(model_dir)
    verify_checkpoint(model_dir, MODEL_FILES)
    model, tokenizer, config = _load_verified_model(model_dir)
    return model.to(device).eval(), tokenizer, config


def load_training_checkpoint(model_dir: Path) -> tuple[VLM, Tokenizer, Config, dict, dict]:
    """Everything ``--resume`` needs, verified once: model, tokenizer, config, trainer and optimizer state."""
    model_dir = Path(model_dir)
    verify_checkpoint(model_dir, TRAINING_FILES)
    model, tokenizer, config = _load_verified_model(model_dir)
    path = model_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    optimizer_file = model_dir / OPTIMIZER
    try:
        optimizer_state = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001  (torch.load raises many types for a damaged or unsafe file)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{optimizer_file}: unreadable optimizer state ({reason})") from None
    return model, tokenizer, config, state, optimizer_state


def _load_verified_model(model_dir: Path) -> tuple[VLM, Tokenizer, Config]:
    config = load_config_file(model_dir)
    weights = model_dir / WEIGHTS
    try:
        tokenizer = Tokenizer.load(model_dir / TOKENIZER)
    except MoevlmError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size != config.model.decoder.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens, "
                              f"config.json expects {config.model.decoder.vocab_size}")
    model = VLM(config.model)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable weights ({err})") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        # load_state_dict would raise a multi-line RuntimeError for these.
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(f"{weights}: weights do not fit config.json ({name} is "
                                  f"{list(tensor.shape)} in the weights, {list(expected[name].shape)} in the model)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "decoder.lm_head.weight" or not config.model.decoder.tie_embeddings]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights}: weights do not fit config.json ({detail})")
    return model, tokenizer, config
