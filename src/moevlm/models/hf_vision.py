"""A pretrained CLIP or SigLIP vision tower as a moevlm image encoder (LLaVA-1.5's feature selection).

Reference: transformers' ``LlavaForConditionalGeneration``: image features are
hidden_states[feature_layer] of the tower, CLS dropped with the "default" strategy.
"""

from __future__ import annotations

import torch
from torch import nn

from moevlm.config import VisionConfig
from moevlm.models.hf_config import VISION_KEY, hf_config_object, load_pretrained

# Processor defaults when a source ships no preprocessor_config.json (OpenAI CLIP's / SigLIP's).
DEFAULT_PIXEL_STATS = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def vision_classes() -> dict[str, type]:
    # Lazy: transformers takes seconds to import.
    from transformers import CLIPVisionModel, SiglipVisionModel

    return {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


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
        model_class = vision_classes()[model_type]
        if not load_weights:
            return cls(cfg, model_class(hf_config_object(cfg.hf_config)))
        if llava is not None:
            model = llava.model.vision_tower
        else:
            model = load_pretrained(model_class, cfg.pretrained, VISION_KEY)
        mean, std = pixel_stats(cfg.pretrained, model_type)
        return cls(cfg, model, mean, std)

    def unused_parameters(self) -> list[str]:
        """Names (in this module) of the tower's parameters the image tokens never depend on: the
        layers after ``feature_layer``, the final LayerNorm and SigLIP's pooling head. Training
        freezes them: they would get no gradient, which DDP takes for an error."""
        layers = self.model.config.num_hidden_layers
        used = self.cfg.feature_layer % (layers + 1)  # hidden_states[k] is the output of layer k - 1
        unused = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if "layers" in parts:
                if int(parts[parts.index("layers") + 1]) >= used:
                    unused.append(name)
            elif "post_layernorm" in parts or "head" in parts:
                unused.append(name)
        return unused

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> (B, num_image_tokens, hidden)."""
        mean, std = self.pixel_mean.view(1, -1, 1, 1), self.pixel_std.view(1, -1, 1, 1)
        pixels = ((images + 1) / 2 - mean) / std  # [-1, 1] -> [0, 1] -> the processor's normalisation
        dtype = next(self.model.parameters()).dtype
        hidden = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.cfg.feature_layer]
        return features[:, 1:] if self.drop_cls else features


def pixel_stats(source: str, model_type: str) -> tuple[list[float], list[float]]:
    """image_mean / image_std from the source's preprocessor_config.json, else the family's."""
    # Lazy: transformers takes seconds to import.
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
        return list(processor["image_mean"]), list(processor["image_std"])
    except (OSError, KeyError, ValueError):
        mean, std = DEFAULT_PIXEL_STATS[model_type]
        return list(mean), list(std)
