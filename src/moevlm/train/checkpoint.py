"""Checkpoint folders (design.md §2): config.json, model.safetensors, tokenizer.json,
trainer_state.json, optimizer.pt.

Every file is written to a temporary name in the same folder and renamed into place, and
trainer_state.json goes last: a crash leaves the previous checkpoint's state file, whose step
no longer matches the weights' metadata, and loading says so instead of mixing two steps.
Weights are safetensors; the optimizer state is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moevlm.config import Config
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import CheckpointError, ConfigError, MoevlmError
from moevlm.models.vlm import VLM

CONFIG, WEIGHTS, TOKENIZER, STATE, OPTIMIZER = (
    "config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def _state_dict_for_saving(model: VLM) -> dict[str, torch.Tensor]:
    # The LM head shares its tensor with the token embedding; safetensors refuses shared
    # storage, so the tied copy is dropped and re-tied by the constructor on load.
    state = model.state_dict()
    if model.cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight")
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def save_checkpoint(out_dir: Path, model: VLM, tokenizer: Tokenizer, config: Config,
                    state: dict | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = str((state or {}).get("step", 0))
    _write_text(out_dir / CONFIG, config.to_json())
    _write_atomic(out_dir / TOKENIZER, lambda tmp: tokenizer.save(tmp))
    _write_atomic(out_dir / WEIGHTS, lambda tmp: save_file(
        _state_dict_for_saving(model), str(tmp), metadata={"format": "pt", "step": step}))
    if optimizer is not None:
        _write_atomic(out_dir / OPTIMIZER, lambda tmp: torch.save(optimizer.state_dict(), tmp))
    if state is not None:
        _write_text(out_dir / STATE, json.dumps(state))


def _require(model_dir: Path, name: str) -> Path:
    path = model_dir / name
    if not path.is_file():
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: no such checkpoint folder")
        raise CheckpointError(f"{model_dir}: not a moevlm checkpoint ({name} is missing)")
    return path


def load_config_file(model_dir: Path) -> Config:
    path = _require(Path(model_dir), CONFIG)
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> tuple[VLM, Tokenizer, Config]:
    """Rebuilds the model from config.json and loads its weights and tokenizer."""
    model_dir = Path(model_dir)
    config = load_config_file(model_dir)
    weights = _require(model_dir, WEIGHTS)
    tokenizer_file = _require(model_dir, TOKENIZER)
    try:
        tokenizer = Tokenizer.load(tokenizer_file)
    except MoevlmError as err:
        raise CheckpointError(str(err)) from None
    model = VLM(config.model)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable weights ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "decoder.lm_head.weight" or not config.model.decoder.tie_embeddings]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights}: weights do not fit config.json ({detail})")
    if tokenizer.vocab_size != config.model.decoder.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens, "
                              f"config.json expects {config.model.decoder.vocab_size}")
    return model.to(device).eval(), tokenizer, config


def weights_step(model_dir: Path) -> int:
    with safe_open(str(_require(Path(model_dir), WEIGHTS)), framework="pt") as handle:
        return int((handle.metadata() or {}).get("step", 0))


def load_training_state(model_dir: Path) -> tuple[dict, dict]:
    """trainer_state.json and the optimizer state, checked against the weights' step."""
    model_dir = Path(model_dir)
    path = _require(model_dir, STATE)
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    step = weights_step(model_dir)
    if step != state.get("step"):
        raise CheckpointError(f"{model_dir}: incomplete checkpoint (weights are from step {step}, "
                              f"trainer_state.json from step {state.get('step')})")
    optimizer_file = _require(model_dir, OPTIMIZER)
    try:
        optimizer_state = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    except Exception as err:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{optimizer_file}: unreadable optimizer state ({err})") from None
    return state, optimizer_state
