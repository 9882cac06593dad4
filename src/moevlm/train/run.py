"""``moevlm train``: the config from the command line, then the model (fresh, from pretrained parts,
from an earlier stage's checkpoint with ``--from``, or restored with ``--resume``), the data
(``data.training_data``), and the trainer."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from moevlm.checkpoint import PreparedModel, read_config, verify_checkpoint
from moevlm.config import Config, flat_keys, load_config
from moevlm.data.tokenizer_factory import TextTokenizer
from moevlm.data.training_data import load_training_data, new_tokenizer
from moevlm.device import resolve_device
from moevlm.errors import ConfigError, MoevlmError
from moevlm.models.factory import build_model
from moevlm.models.hf_config import resolve_pretrained
from moevlm.models.lora import apply_lora
from moevlm.train.distributed import World, close_world, configure_world, join_world, rank_device, strategy_for
from moevlm.train.materialize import MetaStart, build_on_meta, meta_start_applies
from moevlm.train.snapshots import RunCheckpoints
from moevlm.train.stages import continue_from, moe_layers_to_train, pretrained_names
from moevlm.train.tracking import Tracker
from moevlm.train.trainer import Trainer

log = logging.getLogger(__name__)

# Keys a resumed run may change: when to stop, log, validate and checkpoint, and how many workers
# load the data. None of them changes the model, the batches or an update.
# How many ranks and how they split the work may change too: the batches and updates are those
# of the whole batch whatever the split (docs/distributed.md); so may FSDP's
# weight dtype (dist.mixed_precision, which ``auto`` ties to the strategy and the device), and
# activation checkpointing, which trades memory for time and leaves the gradients as they are.
RESUME_MAY_DIFFER = ("train.max_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.max_bad_steps", "train.patience", "train.val_generate",
                     "train.activation_checkpointing", "data.num_workers", "dist.strategy", "dist.expert_parallel",
                     "dist.backend", "dist.timeout_s", "dist.mixed_precision",
                     "dist.meta_init")


def config_from_command_line(preset: str | None, config_file: Path | None, overrides: list[str],
                             stage: str | None = None, from_dir: Path | None = None) -> tuple[Config, bool]:
    """The config ``moevlm train`` asks for (``--from DIR``: that checkpoint's model section instead of
    the preset's), and whether the command line gave any of it (what ``--resume`` then checks)."""
    given = bool(overrides or config_file or preset or stage or from_dir)
    overrides = list(overrides) + ([f"train.stage={stage}"] if stage else [])
    model = None
    if from_dir is not None:
        verify_checkpoint(from_dir)
        model = read_config(from_dir).to_dict()["model"]
    return load_config(preset or "default", config_file, overrides, model=model), given


def _absolute_sources(config: Config) -> Config:
    """A local folder given as a relative path must still be found when the checkpoint is used
    from elsewhere."""
    changes = {f"model.{name}.pretrained": os.path.abspath(section.pretrained)
               for name, section in (("vision", config.model.vision), ("decoder", config.model.decoder))
               if section.pretrained is not None and os.path.isdir(section.pretrained)}
    return config.updated(changes) if changes else config


def prepare_config(config: Config) -> Config:
    """A fresh run's config, complete: sources as absolute folders, the MoE layers of its stage, and
    what the pretrained sources say (``resolve_pretrained``)."""
    config = _absolute_sources(config)
    if moe_layers_to_train(config, []) != config.model.decoder.moe_layer_indices:
        # Stage moe on a dense LM upcycles every FFN: "all" of the pretrained LM's own depth, which
        # resolve_pretrained reads, not the preset's.
        config = config.updated({"model.decoder.moe.layers": "all"})
    return dataclasses.replace(config, model=resolve_pretrained(config.model))


def _fresh_config(config: Config, tokenizer: TextTokenizer | None) -> tuple[Config, TextTokenizer]:
    config = prepare_config(config)
    tokenizer = tokenizer or new_tokenizer(config, [])
    if config.model.tokenizer.kind != "hf":
        config = config.updated({"model.decoder.vocab_size": tokenizer.vocab_size})
    return config, tokenizer


def fresh_model(config: Config, tokenizer: TextTokenizer | None = None) -> PreparedModel:
    """A new model for ``config``: pretrained parts from their sources, the rest initialised from
    train.seed. ``tokenizer`` None: a new one (the LM's own, or char/BPE trained on nothing)."""
    config, tokenizer = _fresh_config(config, tokenizer)
    torch.manual_seed(config.train.seed)  # initial weights, then router noise and dropout
    model = build_model(config.model, load_weights=True)
    if config.model.decoder.lora_rank:
        apply_lora(model.lm, config.model.decoder)
    return PreparedModel(model, tokenizer, config, pretrained_names(model))


def fresh_model_on_meta(config: Config, tokenizer: TextTokenizer | None = None) -> tuple[PreparedModel, MetaStart]:
    """``fresh_model`` with its parameters on the meta device, and what fills each rank's shards of
    them once sharded with the weights ``fresh_model`` would give (train/materialize.py)."""
    config, tokenizer = _fresh_config(config, tokenizer)
    torch.manual_seed(config.train.seed)  # router noise and dropout start where fresh_model leaves them
    model, start = build_on_meta(config)
    return PreparedModel(model, tokenizer, config, pretrained_names(model)), start


def _check_resume_config(asked: dict, state: dict, out: Path) -> None:
    """``asked`` (the command line's config) must be the one the run was started with, but for
    RESUME_MAY_DIFFER; each other difference is named with both values."""
    if "command_config" not in state:
        raise ConfigError(f"{out}: the checkpoint does not record the config its run was started with (written by "
                          f"an older moevlm): resume it with --resume and no --preset/--config/--set/--stage/--from")
    started, now = flat_keys(state["command_config"]), flat_keys(asked)
    differ = [f"{key} {started.get(key)!r} (checkpoint) vs {now.get(key)!r} (now)" for key in sorted(started | now)
              if key not in RESUME_MAY_DIFFER and started.get(key) != now.get(key)]
    if differ:
        raise ConfigError(f"--resume: the command line's config differs from the run in {out}: {'; '.join(differ)} "
                          f"(on resume only {', '.join(RESUME_MAY_DIFFER)} may change)")


def run_training(config: Config, data: Path, out: Path, val_data: Path | None = None, resume: bool = False,
                 max_steps: int | None = None, tracking_uri: str | None = None, tracking: bool = True,
                 progress: bool = True, from_dir: Path | None = None,
                 compare_config: bool = False) -> tuple[Trainer, dict]:
    """``from_dir``: start this stage from an earlier stage's checkpoint (its model and tokenizer,
    with ``config``'s data and train sections); the run itself starts at step 0.

    ``resume``: continue the checkpoint in ``out`` with its own config, or start a fresh run with
    ``config`` when ``out`` holds none yet. ``compare_config``: ``config`` came from the command
    line and must equal the config the run was started with, except the keys in RESUME_MAY_DIFFER,
    which take ``config``'s values; without it, ``config`` is only used for a fresh start.

    Under torchrun every rank calls this (moevlm/train/distributed.py)."""
    out = Path(out)
    device = resolve_device(config.train.device)
    world = join_world(config, device)
    device = rank_device(device, world)
    try:
        return _run(config, data, out, world, device, val_data, resume, max_steps, tracking_uri, tracking, progress,
                    from_dir, compare_config)
    finally:
        close_world(world)


def _load_in_turn(checkpoints: RunCheckpoints, world: World):
    """Rank 0 chooses the checkpoint (setting damaged snapshots aside), then the others read it."""
    loaded = error = None
    if world.is_main:
        try:
            loaded = checkpoints.load()
        except MoevlmError as err:
            error = err
    world.together(error)
    return loaded if world.is_main else checkpoints.load()


def _run(config: Config, data: Path, out: Path, world: World, device: torch.device, val_data: Path | None,
         resume: bool, max_steps: int | None, tracking_uri: str | None, tracking: bool, progress: bool,
         from_dir: Path | None, compare_config: bool) -> tuple[Trainer, dict]:
    checkpoints = RunCheckpoints(out)
    state = optimizer_state = None
    prepared = None
    if resume and not checkpoints.exists():
        log.warning("%s holds no checkpoint yet: starting a fresh run (--resume will continue it)", out)
        resume = False
    # What the command line asked for, before building the model fills in derived values
    # (vocabulary size, a pretrained part's sizes): what a resume's command line is held against.
    command_config = config.to_dict()
    if resume:
        prepared, state, optimizer_state = _load_in_turn(checkpoints, world)
        if compare_config:
            _check_resume_config(command_config, state, out)
            asked = flat_keys(command_config)
            prepared.config = prepared.config.updated({key: asked[key] for key in RESUME_MAY_DIFFER})
        command_config = state.get("command_config")
        config = prepared.config
    elif checkpoints.exists():
        raise MoevlmError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    elif from_dir is not None:
        torch.manual_seed(config.train.seed)  # new routers, then router noise and dropout
        prepared = continue_from(from_dir, config)
        config = prepared.config
    else:
        config = prepare_config(config)
    if max_steps is not None:
        config = config.updated({"train.max_steps": max_steps})
    configure_world(world, config, device)
    training_data = load_training_data(config, data, val_data, prepared.tokenizer if prepared else None,
                                       folder=out if resume else from_dir)
    if world.is_main:
        print(training_data.summary.line(), flush=True)  # beside the run's other notes (step N: val loss ...)
    meta_start = None
    if prepared is None:
        if meta_start_applies(config, world.active):
            prepared, meta_start = fresh_model_on_meta(config, training_data.tokenizer)
            if strategy_for(prepared.config, prepared.model, device) != "fsdp":  # DDP: every rank the whole model
                prepared = meta_start = None
        if prepared is None:
            prepared = fresh_model(config, training_data.tokenizer)
        config = prepared.config
    train_set, val_set = training_data.train_set, training_data.val_set

    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(out, tracking_uri, enabled=tracking and world.is_main, run_id=(state or {}).get("mlflow_run_id"))
    if not resume:
        params = config.to_dict()
        for section in ("vision", "decoder"):  # the backbone's whole config.json; it is in config.json
            params["model"][section].pop("hf_config")
        params["data"].update(train_file=str(data), val_file=str(val_data or ""), from_checkpoint=str(from_dir or ""),
                              skipped_rows=len(training_data.skipped), **training_data.summary.params())
        tracker.log_params(params)
    trainer = Trainer(config, prepared.model, prepared.tokenizer, train_set, val_set, out, tracker, state,
                      optimizer_state, progress=progress, from_source=prepared.from_source,
                      command_config=command_config, world=world, device=device, meta_start=meta_start)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    finally:
        trainer.release_parallel()
    tracker.finish()
    return trainer, result
