"""Rotary position embedding (RoFormer, Su et al. 2021) in transformers' Llama convention.

The rotate-half layout: a head's dimensions i and i + hs/2 form one rotating pair, and the
angles of position p are p * inv_freq with inv_freq = 1 / theta^(2i / hs). Computed exactly as
transformers' ``LlamaRotaryEmbedding`` and ``apply_rotary_pos_emb`` (fp32 angles, cos/sin cast
to the activations' dtype), so an exported decoder computes the same numbers.
"""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos and sin (B, T, head_dim) in ``dtype``."""
    # Recomputed per forward (head_dim / 2 numbers): a buffer would be cast by model.to(bf16).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs); cos, sin (B, T, hs) from ``rope_cos_sin``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
