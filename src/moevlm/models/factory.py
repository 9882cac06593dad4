"""``build_model``, the one factory for both families of model, and ``import_llava``.

A decoder trained from scratch gives ``VLM`` (whose vision encoder may be a pretrained
``HFVisionTower``), a pretrained LM gives ``PretrainedVLM``. The config must first go through
``resolve_pretrained`` (models/hf_config.py). A LLaVA checkpoint given as a source brings its
tower, projector and LM, read once (``LlavaSources``).
"""

from __future__ import annotations

import torch
from torch import nn

from moevlm.config import DecoderConfig, ModelConfig, VisionConfig
from moevlm.errors import MoevlmError
from moevlm.models.hf_config import (
    LM_KEY,
    VISION_KEY,
    hf_config_object,
    is_resolved,
    load_pretrained,
    resolve_pretrained,
    source_config,
)
from moevlm.models.hf_lm import PretrainedVLM
from moevlm.models.hf_vision import HFVisionTower
from moevlm.models.vlm import VLM


class LlavaSources:
    """LLaVA checkpoints loaded while building one model, so vision tower, projector and LM
    of the same source are read once."""

    def __init__(self):
        self.loaded: dict[str, nn.Module] = {}

    def get(self, source: str | None, key: str):
        if source is None or source_config(source, key).model_type != "llava":
            return None
        if source not in self.loaded:
            # Lazy: transformers takes seconds to import.
            from transformers import LlavaForConditionalGeneration

            self.loaded[source] = load_pretrained(LlavaForConditionalGeneration, source, key)
        return self.loaded[source]


def build_model(cfg: ModelConfig, load_weights: bool = True) -> VLM | PretrainedVLM:
    """The model ``cfg`` describes (``cfg`` resolved by ``resolve_pretrained``).

    load_weights: pretrained parts from their sources (a LLaVA source also gives its
    projector); False: random weights from ``hf_config``, for a checkpoint to overwrite."""
    assert is_resolved(cfg), "resolve_pretrained(cfg) first"
    llavas = LlavaSources()
    vision = None
    if cfg.vision.pretrained is not None:
        llava = llavas.get(cfg.vision.pretrained, VISION_KEY) if load_weights else None
        vision = HFVisionTower.build(cfg.vision, load_weights, llava)
    if cfg.decoder.pretrained is None:
        return VLM(cfg, vision)
    lm = None
    if load_weights:
        lm = _load_lm(cfg.decoder, llavas.get(cfg.decoder.pretrained, LM_KEY))
    model = PretrainedVLM(cfg, vision, lm)
    source = llavas.loaded.get(cfg.vision.pretrained) if cfg.vision.pretrained == cfg.decoder.pretrained else None
    if source is not None and cfg.projector.kind == "mlp":
        _copy_llava_projector(source, model.projector, cfg.vision.pretrained)
    return model


def _load_lm(decoder: DecoderConfig, llava: nn.Module | None) -> nn.Module:
    # Lazy: transformers takes seconds to import.
    from transformers import AutoModelForCausalLM

    if llava is None:
        return load_pretrained(AutoModelForCausalLM, decoder.pretrained, LM_KEY)
    # LLaVA holds a base model (language_model) and lm_head; a causal LM is the two together.
    with torch.device("meta"):  # the shell only: both of its parts are replaced right away
        lm = AutoModelForCausalLM.from_config(hf_config_object(decoder.hf_config))
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.lm_head = llava.lm_head
    assert not any(t.is_meta for t in [*lm.parameters(), *lm.buffers()]), "LLaVA LM parts left on meta"
    return lm


def _copy_llava_projector(llava: nn.Module, projector: nn.Module, source: str) -> None:
    """LLaVA's multi_modal_projector (linear_1, act, linear_2) -> our mlp projector."""
    theirs = llava.model.multi_modal_projector
    if llava.config.projector_hidden_act != "gelu":
        raise MoevlmError(f"{VISION_KEY} {source!r}: projector activation {llava.config.projector_hidden_act} "
                          "is not gelu, the only one the mlp projector has")
    with torch.no_grad():
        for ours, their in ((projector[0], theirs.linear_1), (projector[2], theirs.linear_2)):
            ours.weight.copy_(their.weight)
            ours.bias.copy_(their.bias if their.bias is not None else torch.zeros_like(ours.bias))


def import_llava(folder: str) -> tuple[PretrainedVLM, ModelConfig]:
    """A transformers ``LlavaForConditionalGeneration`` checkpoint -> our model, same weights
    and the same image-feature selection (feature layer, select strategy, image token id).
    The same as giving the folder as both sources (``model.vision=hf:DIR model.lm=hf:DIR``)."""
    config = source_config(folder, "llava checkpoint")
    if config.model_type != "llava":
        raise MoevlmError(f"llava checkpoint {folder!r}: a {config.model_type} model, "
                          "not LlavaForConditionalGeneration")
    both = ModelConfig(vision=VisionConfig(pretrained=folder), decoder=DecoderConfig(pretrained=folder))
    cfg = resolve_pretrained(both)
    model = build_model(cfg)
    assert isinstance(model, PretrainedVLM)
    return model, cfg
