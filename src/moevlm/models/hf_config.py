"""Reading pretrained sources: a hub id or folder's transformers config, and ``resolve_pretrained``,
which stores each pretrained part's config.json in our config (``hf_config``) and fills the sizes
from it, so a checkpoint rebuilds the architecture offline.

transformers is imported inside the functions (lazily): it takes seconds, and scratch models never
need it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from moevlm.config import Config, ModelConfig
from moevlm.errors import MoevlmError
from moevlm.models.moe_install import mlp_activation

VISION_KEY, LM_KEY = "model.vision.pretrained", "model.lm.pretrained"
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def source_config(source: str, key: str):
    """The transformers config of a hub id or local folder, or a one-line MoevlmError."""
    # Lazy: transformers takes seconds to import.
    from huggingface_hub import constants
    from transformers import AutoConfig

    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise MoevlmError(f"{key} {source!r}: no such folder")
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise MoevlmError(f"{key} {source!r}: the folder has no config.json (save_pretrained writes one)")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        if Path(source).is_dir():
            raise MoevlmError(f"{key} {source!r}: cannot read config.json ({first_line(err)})") from None
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise MoevlmError(f"{key} {source!r}: not found: not a local folder and not in the Hugging Face cache "
                              "(HF_HUB_OFFLINE=1 needs a local folder or an id downloaded before)") from None
        raise MoevlmError(f"{key} {source!r}: not found locally or on the Hugging Face Hub "
                          f"({first_line(err)})") from None
    except ValueError as err:  # an unknown model_type, or a config.json that is not valid
        raise MoevlmError(f"{key} {source!r}: transformers cannot read its config ({first_line(err)})") from None


def as_dict(config) -> dict:
    """A JSON-safe dict of a transformers config (it goes into the run's config.json)."""
    return json.loads(config.to_json_string(use_diff=False))


def hf_config_object(values: dict):
    # Lazy: transformers takes seconds to import.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def _vision_hf_config(source: str) -> dict:
    config = source_config(source, VISION_KEY)
    # A full CLIP / SigLIP (text and vision) or a LLaVA checkpoint holds the tower's config inside.
    inner = getattr(config, "vision_config", None)
    config = inner if inner is not None else config
    if config.model_type not in VISION_MODEL_TYPES:
        raise MoevlmError(f"{VISION_KEY} {source!r}: a {config.model_type} model, not a CLIP or SigLIP vision model")
    return as_dict(config)


def _lm_hf_config(source: str) -> dict:
    # Lazy: transformers takes seconds to import.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = source_config(source, LM_KEY)
    if config.model_type == "llava":  # the language model of a LLaVA checkpoint
        config = config.text_config
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MoevlmError(f"{LM_KEY} {source!r}: a {config.model_type} model, not a causal LM "
                          "(AutoModelForCausalLM cannot load it)")
    return as_dict(config)


def resolve_pretrained(cfg: ModelConfig) -> ModelConfig:
    """A new, validated ModelConfig with each pretrained part's ``hf_config`` read from its
    source (unless already there, as in a checkpoint) and the sizes filled from it."""
    values = Config(model=cfg).to_dict()["model"]
    vision, decoder = values["vision"], values["decoder"]
    if cfg.vision.pretrained is not None:
        source = cfg.vision.pretrained
        if cfg.vision.hf_config is None:
            vision.update(_llava_feature_choice(source))
            cfg = Config.from_dict({"model": values}).model
        hf = cfg.vision.hf_config or _vision_hf_config(source)
        layers = hf["num_hidden_layers"]
        if not -(layers + 1) <= cfg.vision.feature_layer <= layers:
            raise MoevlmError(f"{VISION_KEY} {source!r}: vision.feature_layer {cfg.vision.feature_layer} is out of "
                              f"range: the tower has {layers + 1} hidden states (-{layers + 1}..{layers})")
        if cfg.vision.keep_cls and hf["model_type"] != "clip_vision_model":
            raise MoevlmError(f"{VISION_KEY} {source!r}: vision.keep_cls needs a CLIP tower; "
                              f"a {hf['model_type']} has no CLS token")
        vision.update(image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
                      depth=layers, heads=hf["num_attention_heads"], channels=hf.get("num_channels", 3), hf_config=hf)
    if cfg.decoder.pretrained is not None:
        hf = cfg.decoder.hf_config or _lm_hf_config(cfg.decoder.pretrained)
        config = hf_config_object(hf)  # attribute_map: GPT-2's n_embd reads as hidden_size, ...
        decoder.update(width=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
                       kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                       ffn_hidden=(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                   or 4 * config.hidden_size),
                       vocab_size=config.vocab_size, tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                       hf_config=hf)
        if decoder["image_token_id"] is None:
            decoder["image_token_id"] = _llava_image_token_id(cfg.decoder.pretrained, cfg.decoder.hf_config)
            if decoder["image_token_id"] is None:
                decoder["image_token_id"] = config.vocab_size  # an id no text token has
        indices = Config.from_dict({"model": values}).model.decoder.moe_layer_indices
        if indices and cfg.decoder.hf_config is None:  # read once; a checkpoint's config already says it
            decoder["moe"]["activation"] = mlp_activation(_lm_skeleton(config), indices) or decoder["moe"]["activation"]
    return Config.from_dict({"model": values}).model


def _lm_skeleton(config) -> nn.Module:
    """The LM's modules without weights (on the meta device): enough to read what its MLPs compute."""
    # Lazy: transformers takes seconds to import.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _llava_feature_choice(source: str) -> dict:
    """A LLaVA source's own feature layer and CLS choice: part of what it was trained with."""
    config = source_config(source, VISION_KEY)
    if config.model_type != "llava":
        return {}
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    tower = config.vision_config.model_type
    if not isinstance(layer, int):
        raise MoevlmError(f"{VISION_KEY} {source!r}: vision_feature_layer {layer} picks several layers; "
                          "only one is supported")
    if tower == "siglip_vision_model" and strategy == "default":  # LLaVA would drop a patch, not a CLS
        raise MoevlmError(f"{VISION_KEY} {source!r}: SigLIP tower with the 'default' select strategy "
                          "(drops the first patch) is not supported")
    if strategy not in ("default", "full"):
        raise MoevlmError(f"{VISION_KEY} {source!r}: unknown vision_feature_select_strategy {strategy!r}")
    return {"feature_layer": layer, "keep_cls": strategy == "full" and tower == "clip_vision_model"}


def _llava_image_token_id(source: str, stored: dict | None) -> int | None:
    """A LLaVA source's own image token id; None for any other LM (or a config read before)."""
    if stored is not None:
        return None
    config = source_config(source, LM_KEY)
    return config.image_token_id if config.model_type == "llava" else None


def is_resolved(cfg: ModelConfig) -> bool:
    return ((cfg.vision.pretrained is None or cfg.vision.hf_config is not None)
            and (cfg.decoder.pretrained is None or cfg.decoder.hf_config is not None))


def load_pretrained(model_class, source: str, key: str) -> nn.Module:
    try:  # fp32 weights: the trainer autocasts; a bf16 checkpoint would otherwise stay bf16
        return model_class.from_pretrained(source, dtype=torch.float32)
    except OSError as err:
        raise MoevlmError(f"{key} {source!r}: cannot load the weights ({first_line(err)})") from None
