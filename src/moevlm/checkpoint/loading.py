"""Loading a checkpoint folder (checksums verified first): ``load_model`` (inference: model, tokenizer,
config), ``load_checkpoint`` (the same as a ``PreparedModel``, which also names the weights read from a
source; a transformers LLaVA folder too) and ``load_training_checkpoint`` (plus the trainer and optimizer
state, for ``--resume``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moevlm.checkpoint.folder import (
    _LEGACY_PREFIX_BYTES,
    _WHOLE,
    CHECKSUMS,
    CONFIG,
    MODEL_FILES,
    OPTIMIZER,
    PRETRAINED,
    SHARDED,
    STATE,
    TRAINING_FILES,
    VERSION_KEY,
    WEIGHTS,
    PreparedModel,
    fingerprint,
    is_sharded,
    tied_copies,
    verify_checkpoint,
)
from moevlm.checkpoint.sharded import ShardedOptimizerState, read_sharded_weights
from moevlm.config import Config
from moevlm.data.tokenizer_factory import load_tokenizer
from moevlm.errors import CheckpointError, ConfigError, MoevlmError
from moevlm.models.factory import build_model, import_llava
from moevlm.models.lora import apply_lora
from moevlm.models.quantized import check_quantize, quantize_model


def read_config(model_dir: Path) -> Config:
    path = Path(model_dir) / CONFIG
    try:
        values = json.loads(path.read_text())
        if isinstance(values, dict):
            values.pop(VERSION_KEY, None)
        return Config.from_dict(values)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu", quantize: str | None = None):
    """Verify the checksums, then rebuild the model from config.json and load weights and tokenizer.
    ``quantize`` (``--quantize``: int8, nf4; None: as saved) swaps quantized weights into the decoder
    (models/quantized.py).

    Returns (model, tokenizer, config); ``load_checkpoint`` also says which weights came from a source.
    """
    quantize = check_quantize(quantize)  # before the seconds of loading
    bundle = load_checkpoint(model_dir)
    model = bundle.model.eval()
    if quantize is not None:
        model = quantize_model(model, quantize, torch.device(device))
    return model.to(device), bundle.tokenizer, bundle.config


def load_checkpoint(model_dir: Path) -> PreparedModel:
    """Verify the checksums, then rebuild the model from config.json with its weights and tokenizer.

    A transformers ``LlavaForConditionalGeneration`` folder (``moevlm export``'s, or llava-hf's) is
    read through ``import_llava`` instead: its weights all come from that folder."""
    model_dir = Path(model_dir)
    if is_transformers_llava(model_dir):
        return _load_transformers_llava(model_dir)
    verify_checkpoint(model_dir, MODEL_FILES)
    return _load_verified_model(model_dir)


def is_transformers_llava(model_dir: Path) -> bool:
    """A folder that transformers wrote (no checksums.json) holding a LLaVA model."""
    if (model_dir / CHECKSUMS).is_file() or not (model_dir / CONFIG).is_file():
        return False
    try:
        return json.loads((model_dir / CONFIG).read_text()).get("model_type") == "llava"
    except (OSError, ValueError, AttributeError):
        return False


def _load_transformers_llava(model_dir: Path) -> PreparedModel:
    model, model_cfg = import_llava(str(model_dir))
    config = Config(model=model_cfg)
    # moevlm export writes the length cap (image tokens + text) as the tokenizer's model_max_length;
    # exports before it, as generation_config.json's max_length.
    max_length = None
    for name, key in (("tokenizer_config.json", "model_max_length"), ("generation_config.json", "max_length")):
        try:
            value = json.loads((model_dir / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and value < 10**9:  # transformers' "no limit" is ~1e30
            max_length = value
            break
    if max_length is not None and max_length - model_cfg.vision.num_image_tokens >= 3:
        config = config.updated({"model.decoder.max_text_len": max_length - model_cfg.vision.num_image_tokens})
        model.cfg = config.model
    try:
        tokenizer = load_tokenizer(model_dir, config.model)
    except MoevlmError as err:
        raise CheckpointError(str(err)) from None
    return PreparedModel(model, tokenizer, config, set(model.state_dict()))


def load_training_checkpoint(model_dir: Path) -> tuple[PreparedModel, dict, dict]:
    """Everything ``--resume`` needs, verified once: the bundle, trainer state and optimizer state.

    DamagedCheckpointError for a missing or corrupted file; any other problem is CheckpointError."""
    model_dir = Path(model_dir)
    verify_checkpoint(model_dir, TRAINING_FILES)
    bundle = _load_verified_model(model_dir)
    path = model_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if is_sharded(model_dir):
        return bundle, state, ShardedOptimizerState(model_dir)
    optimizer_file = model_dir / OPTIMIZER
    try:
        optimizer_state = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001  (torch.load raises many types for a file it refuses)
        # The file matches its checksum, so this is no damage (an unsafe or unknown global, memory, a
        # torch that reads it differently): the same file would fail again, and an older snapshot is no fix.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{optimizer_file}: unreadable optimizer state ({reason})") from None
    return bundle, state, optimizer_state


# Expert tensors as checkpoints written before they were named for their F columns (H, or 2H for
# swiglu) call them.
_OLD_NAMES = {"w1_EDH": "w1_EDF", "b1_EH": "b1_EF"}


def _current_name(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return f"{head}.{_OLD_NAMES[leaf]}" if leaf in _OLD_NAMES else name


def _read_refs(model_dir: Path) -> dict:
    path = model_dir / PRETRAINED
    if not path.is_file():
        return {"untouched": [], "sources": {}}
    try:
        refs = json.loads(path.read_text())
        if not isinstance(refs.get("untouched"), list):
            raise TypeError
        return refs
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: damaged (not the JSON moevlm writes)") from None


def _load_verified_model(model_dir: Path) -> PreparedModel:
    config = read_config(model_dir)
    weights = model_dir / WEIGHTS
    refs = _read_refs(model_dir)
    from_source = set(refs["untouched"])
    try:
        tokenizer = load_tokenizer(model_dir, config.model)
    except MoevlmError as err:
        raise CheckpointError(str(err)) from None
    if config.model.tokenizer.kind != "hf" and tokenizer.vocab_size != config.model.decoder.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens, "
                              f"config.json expects {config.model.decoder.vocab_size}")
    try:
        # Weights no stage trained come from their source; everything else is in model.safetensors.
        model = build_model(config.model, load_weights=bool(from_source))
    except MoevlmError as err:
        raise CheckpointError(f"{model_dir}: this checkpoint loads its untrained pretrained weights from "
                              f"{', '.join(refs['sources'].values())} ({PRETRAINED}): {err}") from None
    if config.model.decoder.lora_rank:
        apply_lora(model.lm, config.model.decoder)
    prefix_bytes = None if refs.get("fingerprint_covers") == _WHOLE else _LEGACY_PREFIX_BYTES
    present = from_source & set(model.state_dict())
    if from_source and fingerprint(model, present, prefix_bytes) != refs.get("fingerprint"):
        raise CheckpointError(f"{model_dir}: the pretrained weights loaded from {', '.join(refs['sources'].values())} "
                              f"are not those this checkpoint was trained with ({PRETRAINED} fingerprint differs)")
    try:
        if is_sharded(model_dir):
            weights = model_dir / SHARDED
            state = read_sharded_weights(model_dir, model)
        else:
            state = {_current_name(name): tensor for name, tensor in load_file(str(weights)).items()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable weights ({err})") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        # load_state_dict would raise a multi-line RuntimeError for these.
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(f"{weights}: weights do not fit config.json ({name} is "
                                  f"{list(tensor.shape)} in the weights, {list(expected[name].shape)} in the model)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_copies(expected)
    missing = [name for name in missing if name not in from_source and name not in tied]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights}: weights do not fit config.json ({detail})")
    return PreparedModel(model, tokenizer, config, from_source)
