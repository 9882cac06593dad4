"""The format of one checkpoint folder (docs/checkpoints.md): config.json, model.safetensors, tokenizer.json,
trainer_state.json, optimizer.pt, and checksums.json (the sha256 of each of them). A model
built on pretrained parts adds its tokenizer's and image processor's own files, and
pretrained.json: the pretrained weights no stage has trained, which are loaded from their
source (hub id or folder) instead of being copied into every checkpoint, with a fingerprint
(sha256 over every byte of them) that tells when the source no longer holds the same weights.
Names tied to one tensor (an LM head tied to the input embedding) count as one tensor: trained
or loaded from the source together, saved and hashed once.

checksums.json is written last and checked before anything is loaded, so a folder cut off
while being written, a truncated copy or a flipped bit is reported with the file's name
instead of being loaded. Weights are safetensors and the optimizer state is read with
``weights_only=True``: loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from moevlm import __version__
from moevlm.config import Config
from moevlm.data.images import image_preparer
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.errors import CheckpointError, DamagedCheckpointError
from moevlm.models.protocol import VisionLanguageModel

CONFIG, WEIGHTS, TOKENIZER, STATE, OPTIMIZER, CHECKSUMS, PRETRAINED = (
    "config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt", "checksums.json",
    "pretrained.json")
# A run on several ranks writes weights and optimizer state as torch.distributed.checkpoint
# shards into this folder instead of model.safetensors and optimizer.pt (train/dist_checkpoint.py).
SHARDED = "sharded"
SHARDED_METADATA = f"{SHARDED}/.metadata"
MODEL_FILES = (CONFIG, WEIGHTS, TOKENIZER)
# config.json's key for the moevlm release that wrote the checkpoint (not a config field).
VERSION_KEY = "moevlm_version"
TRAINING_FILES = MODEL_FILES + (STATE, OPTIMIZER)
# pretrained.json's "fingerprint_covers" for a fingerprint of whole tensors; a file without it is
# from a moevlm whose fingerprint hashed the first 4096 bytes of each tensor, tied copies included.
_WHOLE = "whole tensors"
_LEGACY_PREFIX_BYTES = 4096


@dataclass
class PreparedModel:
    """A model ready to train or use, as a checkpoint holds it besides the training state: the
    network, its tokenizer, the config that describes both, and the pretrained tensors that still
    equal their source (loaded from it, not saved in checkpoints)."""
    model: VisionLanguageModel
    tokenizer: TextTokenizer
    config: Config
    from_source: set[str] = field(default_factory=set)


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


def _storage_key(name: str, tensor: torch.Tensor) -> tuple:
    if not tensor.numel():  # empty tensors may all report the same address; none is tied to another
        return (name,)
    if tensor.is_meta:  # no storage (a model built on meta): a tied parameter is the same object
        return (id(tensor),)
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def tied_copies(state: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor is the same storage as an earlier name's (a tied LM head): safetensors
    refuses shared storage, so these are not written, and the constructor ties them again."""
    seen, copies = set(), set()
    for name, tensor in state.items():
        key = _storage_key(name, tensor)
        if key in seen:
            copies.add(name)
        seen.add(key)
    return copies


def with_tied(names: set[str], state: dict[str, torch.Tensor]) -> set[str]:
    """``names`` and every name of ``state`` tied to one of them (the same tensor under another name)."""
    keys = {_storage_key(name, state[name]) for name in names if name in state}
    return {name for name, tensor in state.items() if _storage_key(name, tensor) in keys}


# model -> (what was hashed, digest): from_source tensors stay as they are through a run, so each
# checkpoint of it need not hash them again. A tensor written to in place gets a new _version.
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model, names: set[str], prefix_bytes: int | None = None) -> str:
    """sha256 over name, shape, dtype and bytes of each named tensor, a tied tensor once; every
    byte, or only the first ``prefix_bytes`` of each tensor (the fingerprint of older checkpoints)."""
    state = model.state_dict()
    if prefix_bytes is None:
        names = set(names) - tied_copies({name: tensor for name, tensor in state.items() if name in names})
    key = (prefix_bytes, tuple((name, state[name].data_ptr(), state[name]._version) for name in sorted(names)))
    cached = _fingerprints.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8)[:prefix_bytes].numpy())
    _fingerprints[model] = key, digest.hexdigest()
    return digest.hexdigest()


def _state_dict_for_saving(model, skip: set[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    skip = skip | tied_copies(state)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if name not in skip}


def _pretrained_refs(config: Config, from_source: set[str], digest: str) -> dict:
    sources = {"vision": config.model.vision.pretrained, "lm": config.model.decoder.pretrained}
    return {"sources": {k: v for k, v in sources.items() if v is not None}, "untouched": sorted(from_source),
            "fingerprint": digest, "fingerprint_covers": _WHOLE}


def write_checkpoint(folder: Path, prepared: PreparedModel, state: dict | None = None,
                     optimizer: torch.optim.Optimizer | None = None, images=None, shards: list[str] | None = None,
                     pretrained_fingerprint: str | None = None) -> list[str]:
    """Write a checkpoint into ``folder`` (a fresh, private folder: files are written in place).

    ``prepared.from_source``: pretrained tensors to reference instead of writing (none with
    train.save_frozen). ``images``: the image preparer in use (data/images.py), whose processor
    files are saved. ``shards``: the files of ``sharded/`` the ranks already wrote (weights and
    optimizer state), with the fingerprint of the pretrained tensors taken before the model was
    sharded. Returns the names written, checksums.json last.
    """
    model, tokenizer, config = prepared.model, prepared.tokenizer, prepared.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from_source = set() if config.train.save_frozen else set(prepared.from_source)
    # Which release wrote the checkpoint, beside the config (as transformers' "transformers_version").
    (folder / CONFIG).write_text(json.dumps({**config.to_dict(), VERSION_KEY: __version__}, indent=2))
    names = [CONFIG, *tokenizer.save(folder)]  # an LM's tokenizer brings several files
    if shards is None:
        assert with_tied(from_source, model.state_dict()) == from_source, "a tied tensor is from its source once"
        save_file(_state_dict_for_saving(model, from_source), str(folder / WEIGHTS),
                  metadata={"format": "pt", "step": str((state or {}).get("step", 0))})
        names.append(WEIGHTS)
        pretrained_fingerprint = fingerprint(model, from_source)
    else:
        names += shards
    if config.model.uses_pretrained:
        (folder / PRETRAINED).write_text(json.dumps(_pretrained_refs(config, from_source, pretrained_fingerprint),
                                                    indent=1))
        names += [PRETRAINED, *(images or image_preparer(config.model)).save(folder)]
    if optimizer is not None and shards is None:
        torch.save(optimizer.state_dict(), folder / OPTIMIZER)
        names.append(OPTIMIZER)
    if state is not None:
        (folder / STATE).write_text(json.dumps(state))
        names.append(STATE)
    sums = {}
    for name in dict.fromkeys(names):
        _fsync_file(folder / name)
        sums[name] = sha256(folder / name)
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1))
    _fsync_file(folder / CHECKSUMS)
    fsync_dir(folder)
    return list(sums) + [CHECKSUMS]


def verify_checkpoint(folder: Path, required: tuple[str, ...] = MODEL_FILES) -> None:
    """Check that ``required`` files, and every other file the model needs (all listed files but the
    training state), are there and match checksums.json; else DamagedCheckpointError naming the file,
    or CheckpointError where the folder or a file cannot be read at all (permissions, I/O)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    try:
        _verify(folder, required)
    except OSError as err:
        raise CheckpointError(f"{err.filename or folder}: cannot read ({err.strerror or err})") from None


def _verify(folder: Path, required: tuple[str, ...]) -> None:
    if is_sharded(folder):
        required = tuple(name for name in required if name not in (WEIGHTS, OPTIMIZER)) + (SHARDED_METADATA,)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise DamagedCheckpointError(f"{folder}: not a complete moevlm checkpoint ({missing[0]} is missing)")
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        raise DamagedCheckpointError(f"{folder}: {CHECKSUMS} is missing (a checkpoint cut off while being written, "
                                     "or one from a moevlm without checksums)")
    try:
        sums = json.loads(manifest.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise DamagedCheckpointError(f"{manifest}: damaged (not the JSON moevlm writes)") from None
    required = tuple(dict.fromkeys(required + tuple(name for name in sums if name not in (STATE, OPTIMIZER))))
    for name in required:
        if not (folder / name).is_file():
            raise DamagedCheckpointError(f"{folder}: not a complete moevlm checkpoint ({name} is missing)")
        if name not in sums:
            raise DamagedCheckpointError(f"{folder}: {name} is not listed in {CHECKSUMS} (incomplete checkpoint)")
        if sha256(folder / name) != sums[name]:
            raise DamagedCheckpointError(f"{folder / name}: checksum mismatch (the file is corrupted, truncated "
                                         "or from another checkpoint)")


def is_sharded(folder: Path) -> bool:
    """A checkpoint written by several ranks (weights in ``sharded/``): what its checksums list."""
    try:
        return SHARDED_METADATA in json.loads((Path(folder) / CHECKSUMS).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False

