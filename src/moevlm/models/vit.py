"""Vision Transformer encoder (Dosovitskiy et al. 2020), trainable from scratch.

Convolutional patch embedding, a CLS token, learned positions and pre-LN blocks, as in
nanoVLM's ViT. ``image_tokens`` picks what the rest of the model sees: the CLS token only
(the seed's choice), every patch token, or the patch grid average-pooled to a few tokens.

``vision.arch=siglip`` is the layout of transformers' SigLIP vision tower: no CLS token, positions
for the patches only, no final LayerNorm (the hidden state LLaVA takes never passes SigLIP's
post_layernorm); every patch is an image token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import VisionConfig
from moevlm.models.attention import SelfAttention
from moevlm.models.mlp import FeedForward


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, hidden, dropout)

    def forward(self, x: torch.Tensor, num_outputs: int | None = None) -> torch.Tensor:
        """``num_outputs``: compute only the first that many positions' outputs (all positions
        are still attended to) - the last block when only the CLS token is used."""
        x = x[:, :num_outputs] + self.attn(self.ln1(x), num_queries=num_outputs)
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        siglip = cfg.arch == "siglip"
        self.cls = None if siglip else nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches + (0 if siglip else 1), cfg.width))
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.width, cfg.heads, int(cfg.mlp_ratio * cfg.width), cfg.dropout) for _ in range(cfg.depth))
        self.ln = None if siglip else nn.LayerNorm(cfg.width)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, S, S) in [-1, 1] -> image tokens (B, num_image_tokens, width)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, W)
        if self.cls is None:  # siglip: the patches are the image tokens (the config allows no other)
            x = x + self.pos
            for block in self.blocks:
                x = block(x)
            return x
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1) + self.pos  # (B, 1 + P, W)
        cls_only = self.cfg.image_tokens == "cls"
        for i, block in enumerate(self.blocks):
            # With CLS-only output, the last block's other positions would be thrown away.
            x = block(x, 1 if cls_only and i == len(self.blocks) - 1 else None)
        x = self.ln(x)
        if cls_only:
            return x
        patches = x[:, 1:]
        if self.cfg.image_tokens == "patches":
            return patches
        B, P, W = patches.shape
        grid = int(P ** 0.5)
        side = int(self.cfg.pooled_tokens ** 0.5)
        pooled = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(B, W, grid, grid), side)
        return pooled.flatten(2).transpose(1, 2)  # (B, side * side, W)
