"""The vision encoder as a transformers vision model (its config and weights, named under
``vision_tower.``) and how LLaVA selects its features.

moevlm's own ``siglip`` encoder is SigLIP's computation: patch convolution with bias, learned
positions, pre-LN blocks with biases and exact GELU, and image tokens taken from the last block's
output, before ``post_layernorm`` (LLaVA's ``vision_feature_layer=-1`` never applies it, so it is
written as the identity). A pretrained CLIP/SigLIP tower is written as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moevlm.config import ModelConfig


@dataclass
class VisionPart:
    config: dict  # the vision_config
    weights: dict[str, torch.Tensor]  # "vision_model.*" (the LLaVA prefix comes later)
    feature_layer: int
    select_strategy: str  # "full": every token of the layer; "default": CLS dropped
    pixel_mean: list[float]
    pixel_std: list[float]


def scratch_vision_part(vit: nn.Module, model_cfg: ModelConfig) -> VisionPart:
    v = model_cfg.vision
    config = {"model_type": "siglip_vision_model", "hidden_size": v.width,
              "intermediate_size": int(v.mlp_ratio * v.width),
              "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "num_channels": v.channels,
              "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
              "attention_dropout": 0.0, "vision_use_head": False}
    base = "vision_model."
    weights = {base + "embeddings.patch_embedding.weight": vit.patch_embed.weight,
               base + "embeddings.patch_embedding.bias": vit.patch_embed.bias,
               base + "embeddings.position_embedding.weight": vit.pos[0],
               base + "post_layernorm.weight": torch.ones_like(vit.patch_embed.bias),
               base + "post_layernorm.bias": torch.zeros_like(vit.patch_embed.bias)}
    for i, block in enumerate(vit.blocks):
        layer = f"{base}encoder.layers.{i}."
        qkv = zip(block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3))
        for part, (weight, bias) in zip(("q", "k", "v"), qkv):
            weights[layer + f"self_attn.{part}_proj.weight"] = weight
            weights[layer + f"self_attn.{part}_proj.bias"] = bias
        for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                             ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            weights[layer + theirs + ".weight"] = module.weight
            weights[layer + theirs + ".bias"] = module.bias
    # Images in [-1, 1] are what the ViT was trained on: rescale by 1/255, then (x - 0.5) / 0.5.
    return VisionPart(config, weights, -1, "full", [0.5] * 3, [0.5] * 3)


def pretrained_vision_part(tower: nn.Module, model_cfg: ModelConfig) -> VisionPart:
    """An ``HFVisionTower``: the CLIP/SigLIP model as it is (SigLIP's pooling head left out)."""
    v = model_cfg.vision
    config = {key: value for key, value in v.hf_config.items() if key not in ("transformers_version", "_name_or_path")}
    siglip = config["model_type"] == "siglip_vision_model"
    if siglip:
        config["vision_use_head"] = False  # vLLM assumes a head when the key is absent
    weights = {}
    for name, tensor in tower.model.state_dict(keep_vars=True).items():
        name = name.removeprefix("vision_model.")  # transformers 5 dropped the wrapper; llava-hf keeps it
        if not (siglip and name.startswith("head.")):
            weights["vision_model." + name] = tensor
    strategy = "full" if siglip or v.keep_cls else "default"
    return VisionPart(config, weights, v.feature_layer, strategy, tower.pixel_mean.tolist(), tower.pixel_std.tolist())
