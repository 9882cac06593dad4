"""Multimodal projector: image-encoder features -> decoder embedding space.

"mlp" is LLaVA-1.5's two-layer GELU MLP; "linear" is the original LLaVA projection.
"""

from torch import nn

from moevlm.config import ProjectorConfig


def build_projector(cfg: ProjectorConfig, vision_width: int, text_width: int) -> nn.Module:
    if cfg.kind == "linear":
        return nn.Linear(vision_width, text_width)
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
