"""The format of one checkpoint folder (README, "Checkpoints"): config.json, model.safetensors, tokenizer.json,
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
``weights_only=True``: loading never runs pickled code. Keeping a run's checkpoints and
choosing one to resume from is ``moevlm.train.snapshots.RunCheckpoints``.

Loading: ``load_model`` (inference: model, tokenizer, config), ``load_checkpoint`` (the same as a
``PreparedModel``, which also names the weights read from a source) and
``load_training_checkpoint`` (plus the trainer and optimizer state, for ``--resume``);
``resolve_checkpoint``: which folder of a run ``--checkpoint last|best|step-N`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moevlm import __version__
from moevlm.config import Config
from moevlm.data.images import image_preparer
from moevlm.data.tokenizer_factory import TextTokenizer, load_tokenizer
from moevlm.errors import CheckpointError, ConfigError, DamagedCheckpointError, MoevlmError
from moevlm.models.factory import build_model, import_llava
from moevlm.models.lora import apply_lora
from moevlm.models.protocol import VisionLanguageModel
from moevlm.models.quantized import check_quantize, quantize_model

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
# A run folder keeps complete checkpoints of some steps in checkpoints/step-00000500/ (train/snapshots.py).
SNAPSHOTS = "checkpoints"
SNAPSHOT_NAME = re.compile(r"step-(\d+)")
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


@dataclass
class ShardedOptimizerState:
    """The optimizer state of a sharded checkpoint: read once the run's optimizer exists."""
    folder: Path


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


def _read_sharded_weights(model_dir: Path, model) -> dict[str, torch.Tensor]:
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
            state = _read_sharded_weights(model_dir, model)
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
