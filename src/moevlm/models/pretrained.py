"""Pretrained parts from transformers: CLIP/SigLIP vision towers, any causal LM, LLaVA import.

References: LLaVA-1.5 (Liu et al. 2023) and transformers' ``LlavaForConditionalGeneration``,
whose layout this follows exactly: image features are hidden_states[feature_layer] of the
tower (CLS dropped with the "default" strategy), a two-layer GELU projector, and placeholder
ids in the text whose embeddings are replaced by the projected features. litgpt's LLaVA /
Mixtral parity tests are the model for tests/models/test_parity.py.

``build_model`` is the one factory: a decoder trained from scratch gives ``VLM`` (whose vision
encoder may be a pretrained ``HFVisionTower``), a pretrained LM gives ``PretrainedVLM``. The
config must first go through ``resolve_pretrained``, which reads each source's config.json
once and stores it in ``hf_config``, so a checkpoint rebuilds the architecture offline.

transformers is imported inside the functions: it takes seconds, and scratch models never
need it.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from moevlm.config import Config, DecoderConfig, ModelConfig, VisionConfig
from moevlm.errors import MoevlmError
from moevlm.models.moe import IMAGE, PAD, TEXT, MoE
from moevlm.models.projector import build_projector
from moevlm.models.vit import ViT
from moevlm.models.vlm import VLM, VLMOutput, expert_load, vlm_output

VISION_KEY, LM_KEY = "model.vision.pretrained", "model.lm.pretrained"
# Processor defaults when a source ships no preprocessor_config.json (OpenAI CLIP's / SigLIP's).
_DEFAULT_PIXEL_STATS = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _vision_classes() -> dict[str, type]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _source_config(source: str, key: str):
    """The transformers config of a hub id or local folder, or a one-line MoevlmError."""
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
            raise MoevlmError(f"{key} {source!r}: cannot read config.json ({_first_line(err)})") from None
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise MoevlmError(f"{key} {source!r}: not found: not a local folder and not in the Hugging Face cache "
                              "(HF_HUB_OFFLINE=1 needs a local folder or an id downloaded before)") from None
        raise MoevlmError(f"{key} {source!r}: not found locally or on the Hugging Face Hub "
                          f"({_first_line(err)})") from None
    except ValueError as err:  # an unknown model_type, or a config.json that is not valid
        raise MoevlmError(f"{key} {source!r}: transformers cannot read its config ({_first_line(err)})") from None


def _as_dict(config) -> dict:
    """A JSON-safe dict of a transformers config (it goes into the run's config.json)."""
    return json.loads(config.to_json_string(use_diff=False))


def _from_dict(values: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def _vision_hf_config(source: str) -> dict:
    config = _source_config(source, VISION_KEY)
    # A full CLIP / SigLIP (text and vision) or a LLaVA checkpoint holds the tower's config inside.
    inner = getattr(config, "vision_config", None)
    config = inner if inner is not None else config
    if config.model_type not in _DEFAULT_PIXEL_STATS:
        raise MoevlmError(f"{VISION_KEY} {source!r}: a {config.model_type} model, not a CLIP or SigLIP vision model")
    return _as_dict(config)


def _lm_hf_config(source: str) -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _source_config(source, LM_KEY)
    if config.model_type == "llava":  # the language model of a LLaVA checkpoint
        config = config.text_config
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MoevlmError(f"{LM_KEY} {source!r}: a {config.model_type} model, not a causal LM "
                          "(AutoModelForCausalLM cannot load it)")
    return _as_dict(config)


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
        config = _from_dict(hf)  # attribute_map: GPT-2's n_embd reads as hidden_size, ...
        decoder.update(width=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
                       ffn_hidden=(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                   or 4 * config.hidden_size),
                       vocab_size=config.vocab_size, tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                       hf_config=hf)
        if decoder["image_token_id"] is None:
            decoder["image_token_id"] = _llava_image_token_id(cfg.decoder.pretrained, cfg.decoder.hf_config)
            if decoder["image_token_id"] is None:
                decoder["image_token_id"] = config.vocab_size  # an id no text token has
    return Config.from_dict({"model": values}).model


def _llava_feature_choice(source: str) -> dict:
    """A LLaVA source's own feature layer and CLS choice: part of what it was trained with."""
    config = _source_config(source, VISION_KEY)
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
    config = _source_config(source, LM_KEY)
    return config.image_token_id if config.model_type == "llava" else None


def _is_resolved(cfg: ModelConfig) -> bool:
    return ((cfg.vision.pretrained is None or cfg.vision.hf_config is not None)
            and (cfg.decoder.pretrained is None or cfg.decoder.hf_config is not None))


class _Llavas:
    """LLaVA checkpoints loaded while building one model, so vision tower, projector and LM
    of the same source are read once."""

    def __init__(self):
        self.loaded: dict[str, nn.Module] = {}

    def get(self, source: str | None, key: str):
        if source is None or _source_config(source, key).model_type != "llava":
            return None
        if source not in self.loaded:
            from transformers import LlavaForConditionalGeneration

            self.loaded[source] = _load(LlavaForConditionalGeneration, source, key)
        return self.loaded[source]


def _load(model_class, source: str, key: str) -> nn.Module:
    try:  # fp32 weights: the trainer autocasts; a bf16 checkpoint would otherwise stay bf16
        return model_class.from_pretrained(source, dtype=torch.float32)
    except OSError as err:
        raise MoevlmError(f"{key} {source!r}: cannot load the weights ({_first_line(err)})") from None


class HFVisionTower(nn.Module):
    """A CLIP or SigLIP vision model -> image tokens (B, n, hidden), selected as LLaVA does:
    hidden_states[feature_layer], CLS dropped unless ``keep_cls`` (SigLIP has none).

    Takes images in [-1, 1] like every moevlm encoder and applies the tower's own
    normalisation from ``pixel_mean`` / ``pixel_std`` (persistent buffers: a checkpoint
    carries the processor statistics the tower was trained with)."""

    def __init__(self, cfg: VisionConfig, model: nn.Module, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32))
        self.drop_cls = model.config.model_type == "clip_vision_model" and not cfg.keep_cls

    @classmethod
    def build(cls, cfg: VisionConfig, load_weights: bool = True, llava: nn.Module | None = None) -> "HFVisionTower":
        """From ``cfg.vision.pretrained`` (load_weights) or random from ``hf_config``; ``llava``:
        a loaded LlavaForConditionalGeneration whose tower to take."""
        assert cfg.hf_config is not None, "resolve_pretrained(cfg) first"
        model_type = cfg.hf_config["model_type"]
        model_class = _vision_classes()[model_type]
        if not load_weights:
            return cls(cfg, model_class(_from_dict(cfg.hf_config)))
        model = llava.model.vision_tower if llava is not None else _load(model_class, cfg.pretrained, VISION_KEY)
        mean, std = _pixel_stats(cfg.pretrained, model_type)
        return cls(cfg, model, mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> (B, num_image_tokens, hidden)."""
        mean, std = self.pixel_mean.view(1, -1, 1, 1), self.pixel_std.view(1, -1, 1, 1)
        pixels = ((images + 1) / 2 - mean) / std  # [-1, 1] -> [0, 1] -> the processor's normalisation
        dtype = next(self.model.parameters()).dtype
        hidden = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.cfg.feature_layer]
        return features[:, 1:] if self.drop_cls else features


def _pixel_stats(source: str, model_type: str) -> tuple[list[float], list[float]]:
    """image_mean / image_std from the source's preprocessor_config.json, else the family's."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
        return list(processor["image_mean"]), list(processor["image_std"])
    except (OSError, KeyError, ValueError):
        mean, std = _DEFAULT_PIXEL_STATS[model_type]
        return list(mean), list(std)


class PretrainedVLM(nn.Module):
    """A vision encoder, a projector and a transformers causal LM (``vision``, ``projector``,
    ``lm``), joined as LLaVA does: input_ids hold ``image_token_id`` at the image positions
    (``num_image_tokens`` of them per sample) and their embeddings become the projected image
    features. Same interface as ``VLM``: forward, moe_layers, expert_load, new_cache,
    prefill, step. MoE layers (decoder.moe_layer_indices) replace the LM's dense MLPs
    (models/upcycle.py); each learns which tokens are image / text / padding from
    ``token_kind``, set before every LM call."""

    images_in_text = True

    def __init__(self, cfg: ModelConfig, vision: nn.Module | None = None, lm: nn.Module | None = None):
        """``vision`` / ``lm`` None: random weights from the configs (a checkpoint overwrites them)."""
        super().__init__()
        assert _is_resolved(cfg) and cfg.decoder.pretrained is not None, "resolve_pretrained(cfg) first"
        self.cfg = cfg
        self.num_image_tokens = cfg.vision.num_image_tokens
        self.image_token_id = cfg.decoder.image_token_id
        if vision is None:
            vision = (HFVisionTower.build(cfg.vision, load_weights=False) if cfg.vision.pretrained is not None
                      else ViT(cfg.vision))
        self.vision = vision
        self.projector = build_projector(cfg.projector, cfg.vision.width, cfg.decoder.width)
        if lm is None:
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_config(_from_dict(cfg.decoder.hf_config), dtype=torch.float32)
        self.lm = lm
        # transformers renamed past_key_values to cache during 5.x; speak whichever this LM takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"
        if cfg.decoder.moe_layer_indices:
            from moevlm.models.upcycle import install_moe_layers  # upcycle imports vlm; keep this lazy

            install_moe_layers(self.lm, cfg.decoder)

    # -- MoE bookkeeping ------------------------------------------------------------------
    def _moe_mlps(self) -> list[nn.Module]:
        # Looked up each time: upcycle() and LoRA wrapping change the LM after construction.
        return [m for m in self.lm.modules() if isinstance(getattr(m, "moe", None), MoE) and hasattr(m, "token_kind")]

    @property
    def moe_layers(self) -> list[MoE]:
        return [m.moe for m in self._moe_mlps()]

    def expert_load(self) -> torch.Tensor:
        """Routed token counts of the last forward: (MoE layers, 2 [image, text], experts)."""
        return expert_load(self.moe_layers)

    # -- the shared pieces of forward / prefill / step ------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [-1, 1] -> image tokens in the LM's space (B, n_img, D)."""
        return self.projector(self.vision(images))

    def _embed(self, images: torch.Tensor | None, input_ids: torch.Tensor,
               text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, D) with image features at the image ids, and token kinds (B, T)."""
        is_image = input_ids == self.image_token_id
        # The image id may lie outside the embedding table (default: the vocabulary size).
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if images is not None:
            counts = is_image.sum(1)
            assert bool((counts == self.num_image_tokens).all()), (
                f"every row needs {self.num_image_tokens} image ids ({self.image_token_id}), got {counts.tolist()}")
            features = self.encode_images(images).to(embeds.dtype)  # (B, n, D), in row order
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        else:
            assert not bool(is_image.any()), "image ids in input_ids but no images"
        kind = torch.where(text_mask, torch.where(is_image, IMAGE, TEXT), PAD)
        return embeds, kind

    def _run_lm(self, embeds: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor,
                kind: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        mlps = self._moe_mlps()
        for mlp in mlps:
            mlp.token_kind = kind
        try:
            extra = {self._cache_arg: cache, **({"logits_to_keep": 1} if last_only else {})}
            out = self.lm(inputs_embeds=embeds, attention_mask=key_mask.long(), position_ids=positions,
                          use_cache=cache is not None, **extra)
        finally:  # a stale (B, T) would trip the next caller of the LM that does not set it
            for mlp in mlps:
                mlp.token_kind = None
        return out.logits

    # -- training / evaluation -------------------------------------------------------------
    def forward(self, images: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> VLMOutput:
        """images (B, C, S, S) (None for text only); input_ids, attention_mask, labels (B, T),
        labels being next-token targets aligned with input_ids (-100: no loss)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        embeds, kind = self._embed(images, input_ids, mask)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # real tokens only: left padding is invisible
        logits = self._run_lm(embeds, mask, positions, kind)
        return vlm_output(logits, labels, self.moe_layers, self.cfg.decoder.moe)

    # -- generation ------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int):
        """A transformers DynamicCache (it grows as needed; batch and max_len are not used)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def prefill(self, images: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompts (image ids included) -> next-token logits (B, V), key mask (B, T)."""
        mask = attention_mask.bool()
        embeds, kind = self._embed(images, input_ids, mask)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        logits = self._run_lm(embeds, mask, positions, kind, cache, last_only=True)
        return logits[:, -1], mask

    def step(self, token_ids: torch.Tensor, key_mask: torch.Tensor, cache) -> torch.Tensor:
        """One cached decoding step. token_ids (B,); key_mask (B, S) includes the new token."""
        positions = key_mask.long().sum(1, keepdim=True) - 1  # (B, 1)
        embeds = self.lm.get_input_embeddings()(token_ids[:, None])
        kind = torch.full_like(positions, TEXT)
        return self._run_lm(embeds, key_mask, positions, kind, cache, last_only=True)[:, -1]


def build_model(cfg: ModelConfig, load_weights: bool = True) -> VLM | PretrainedVLM:
    """The model ``cfg`` describes (``cfg`` resolved by ``resolve_pretrained``).

    load_weights: pretrained parts from their sources (a LLaVA source also gives its
    projector); False: random weights from ``hf_config``, for a checkpoint to overwrite."""
    assert _is_resolved(cfg), "resolve_pretrained(cfg) first"
    llavas = _Llavas()
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
    from transformers import AutoModelForCausalLM

    if llava is None:
        return _load(AutoModelForCausalLM, decoder.pretrained, LM_KEY)
    # LLaVA holds a base model (language_model) and lm_head; a causal LM is the two together.
    with torch.device("meta"):  # the shell only: both of its parts are replaced right away
        lm = AutoModelForCausalLM.from_config(_from_dict(decoder.hf_config))
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
    config = _source_config(folder, "llava checkpoint")
    if config.model_type != "llava":
        raise MoevlmError(f"llava checkpoint {folder!r}: a {config.model_type} model, "
                          "not LlavaForConditionalGeneration")
    cfg = resolve_pretrained(ModelConfig(vision=VisionConfig(pretrained=folder), decoder=DecoderConfig(pretrained=folder)))
    model = build_model(cfg)
    assert isinstance(model, PretrainedVLM)
    return model, cfg
