"""Training stages of the pretrained-parts recipe (LLaVA, MoE-LLaVA): which weights learn, at which
learning rate, and which pretrained weights no stage has touched yet.

    pretrain   projector only (vision tower and LM frozen), on image-caption pairs
    instruct   projector + LM, on conversations; the loss covers assistant answers only
    moe        the MoE layers (experts and routers) after upcycling the LM's dense FFNs
    full       everything (a model trained from scratch)

Parameters fall into four groups by where they live: ``vision``, ``projector``, ``moe`` (every
parameter of an MoE layer) and ``lm`` (the rest of the decoder). With LoRA adapters on the LM,
the ``lm`` group trains only the adapters; the base weights stay frozen. Stage moe with LoRA
trains the adapters too.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moevlm.checkpoint import PreparedModel, load_checkpoint, with_tied
from moevlm.config import PARAM_GROUPS, Config, ModelConfig, TrainConfig, flat_keys
from moevlm.errors import ConfigError
from moevlm.models.lora import apply_lora, has_lora, merge_lora, names_after_lora
from moevlm.models.moe import MoE
from moevlm.models.upcycle import upcycle

# Which parameter groups each stage trains (train.trainable overrides it).
STAGE_TRAINABLE = {"full": PARAM_GROUPS, "pretrain": ("projector",), "instruct": ("projector", "lm", "moe"),
                   "moe": ("moe",)}


def group_of_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> vision | projector | moe | lm."""
    in_moe = {f"{module_name}.{name}" for module_name, module in model.named_modules() if isinstance(module, MoE)
              for name, _ in module.named_parameters()}
    groups = {}
    for name, _ in model.named_parameters():
        if name in in_moe:
            groups[name] = "moe"
        elif name.startswith(("vision.", "projector.")):
            groups[name] = name.split(".", 1)[0]
        else:
            groups[name] = "lm"
    return groups


def trainable_groups(cfg: TrainConfig) -> tuple[str, ...]:
    return tuple(cfg.trainable) if cfg.trainable is not None else STAGE_TRAINABLE[cfg.stage]


def freeze_for_stage(model: nn.Module, cfg: TrainConfig) -> dict[str, list[nn.Parameter]]:
    """Set requires_grad for the stage; returns the trainable parameters by group."""
    chosen = trainable_groups(cfg)
    groups = group_of_parameters(model)
    lora = any("lora_" in name for name in groups)
    if lora and cfg.trainable is None and cfg.stage == "moe":
        chosen += ("lm",)  # LoRA in stage moe: the adapters learn beside the MoE layers
    if lora and "lm" not in chosen:
        raise ConfigError(f"decoder.lora_rank is set but train.stage {cfg.stage} does not train the lm group "
                          f"(trains {', '.join(chosen)}): set decoder.lora_rank=0 or add lm to train.trainable")
    unused = {f"vision.{name}" for name in getattr(model.vision, "unused_parameters", list)()}
    out: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        group = groups[name]
        learns = group in chosen and (not lora or group != "lm" or "lora_" in name) and name not in unused
        param.requires_grad_(learns)
        if learns:
            out.setdefault(group, []).append(param)
    if not out:
        present = sorted(set(groups.values()))
        raise ConfigError(f"train.stage {cfg.stage} trains {', '.join(chosen)}, and this model has none of those "
                          f"(it has {', '.join(present)}); for stage moe upcycle first or set moe.layers")
    return out


def moe_layers_to_train(config: Config, existing: list[int]) -> list[int]:
    """The MoE layers a run of ``config`` has, on a model whose MoE layers are ``existing``: those
    moe.layers asks for, or, in stage moe on a model without any, every layer (upcycled)."""
    layers = config.model.decoder.moe_layer_indices
    if not layers and not existing and config.train.stage == "moe":
        return list(range(config.model.decoder.depth))
    return layers


def group_lr(cfg: TrainConfig, group: str) -> float:
    value = getattr(cfg, f"lr_{group}")
    return cfg.lr if value is None else value


def pretrained_names(model: nn.Module) -> set[str]:
    """Tensors that come from pretrained sources as built: the HF vision tower and LM, without
    MoE layers (new) and LoRA adapters (new)."""
    cfg = model.cfg
    prefixes = tuple(p for p, source in (("vision.", cfg.vision.pretrained), ("lm.", cfg.decoder.pretrained))
                     if source is not None)
    if not prefixes:
        return set()
    groups = group_of_parameters(model)
    return {name for name in model.state_dict() if name.startswith(prefixes)
            and groups.get(name) != "moe" and "lora_" not in name}


def still_from_source(from_source: set[str], model: nn.Module) -> set[str]:
    """What stays from_source through a stage: present in the model and not trained. A tied LM head
    learns with the embedding, though ``named_parameters`` lists their one tensor under the embedding's name only."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves: ties show on a meta model too
    learning = with_tied({name for name, param in model.named_parameters() if param.requires_grad}, state)
    return {name for name in from_source if name in state and name not in learning}


# Model settings a new stage may change; any other difference from the --from checkpoint would
# not fit its weights. MoE structure may change only by upcycling a dense model.
_STAGE_SETTINGS = ("decoder.moe.", "decoder.lora_", "decoder.dropout", "vision.dropout")
_MOE_STRUCTURE = ("num_experts", "top_k", "shared_expert", "router_noise", "activation")


def _check_same_model(old: ModelConfig, new: ModelConfig, model_dir: Path) -> None:
    before, after = flat_keys(_input_dict(old)), flat_keys(_input_dict(new))
    changeable = _STAGE_SETTINGS + (("decoder.max_text_len",) if old.decoder.pretrained else ())
    for key in before:
        if before[key] != after.get(key) and not key.startswith(changeable):
            raise ConfigError(f"--from {model_dir}: model.{key} is {before[key]!r} there, {after.get(key)!r} here; "
                              "a new stage keeps the model (only moe.*, decoder.lora_* and dropout may change)")
    if old.decoder.moe_layer_indices:
        for name in _MOE_STRUCTURE + ("layers",):
            was, now = getattr(old.decoder.moe, name), getattr(new.decoder.moe, name)
            if name == "layers":
                was, now = old.decoder.moe_layer_indices, new.decoder.moe_layer_indices
            if was != now:
                raise ConfigError(f"--from {model_dir}: moe.{name} is {was!r} there, {now!r} here; the MoE layers "
                                  "of a model that has them stay as they are")


def _input_dict(model_cfg: ModelConfig) -> dict:
    return Config(model=model_cfg).to_dict()["model"]


def load_merged(model_dir: Path) -> PreparedModel:
    """A checkpoint with its LoRA adapters, if any, folded into their weights (which have then learned)."""
    prepared = load_checkpoint(model_dir)
    if not has_lora(prepared.model):
        return prepared
    merge_lora(prepared.model)
    return PreparedModel(prepared.model, prepared.tokenizer, prepared.config.updated({"model.decoder.lora_rank": 0}),
                         prepared.from_source & set(prepared.model.state_dict()))


def continue_from(model_dir: Path, config: Config) -> PreparedModel:
    """The model of an earlier stage's checkpoint, made ready for ``config``'s stage: LoRA adapters
    merged into their weights, dense FFNs upcycled to MoE where ``config`` asks for MoE layers the
    checkpoint does not have (stage moe on a dense model: all layers unless moe.layers says
    otherwise), new LoRA adapters added. The returned config describes the model as it now is."""
    prepared = load_merged(model_dir)
    model, old, from_source = prepared.model, prepared.config.model, prepared.from_source
    wanted = config.model
    _check_same_model(old, wanted, model_dir)
    layers = moe_layers_to_train(config, old.decoder.moe_layer_indices)
    values = config.to_dict()
    values["model"]["decoder"]["moe"]["layers"] = old.decoder.moe.layers  # what the model has, until upcycled
    values["model"]["decoder"]["lora_rank"] = 0
    current = Config.from_dict(values)
    if layers != old.decoder.moe_layer_indices:
        model, current = upcycle(model, current, wanted.decoder.moe.num_experts, wanted.decoder.moe.top_k, layers)
    if wanted.decoder.lora_rank:
        current = current.updated({"model.decoder.lora_rank": wanted.decoder.lora_rank})
        apply_lora(model.lm, current.model.decoder)
        from_source = names_after_lora(from_source, model)
    return PreparedModel(model, prepared.tokenizer, current, from_source)


# Marks a temporary folder as moevlm's own, so that a later upcycle may delete it.
