"""Decoder-only transformer whose feed-forward layers are (mostly) sparse MoE layers.

Pre-LN blocks as in GPT-2/nanoGPT: x = x + attn(ln1(x)); x = x + ffn(ln2(x)). (The seed added
the second residual to the normalized stream, a known fault.) The decoder works on
embeddings, so image tokens from the projector and text-token embeddings share one sequence.

``decoder.arch`` picks the parts: gpt (LayerNorm, a learned position embedding, biases, GELU) or
llama (RMSNorm, RoPE on q and k, no biases, optional grouped-query attention, SwiGLU dense layers,
shared expert and experts). llama's parameters are laid out as transformers' Llama / Mixtral /
Qwen2-MoE hold theirs, so such a decoder exports by renaming and splitting fused matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moevlm.config import DecoderConfig
from moevlm.models.attention import KVCache, SelfAttention
from moevlm.models.mlp import FeedForward
from moevlm.models.moe import MoE
from moevlm.models.norm import RMSNorm
from moevlm.models.rope import rope_cos_sin


def _norm(cfg: DecoderConfig) -> nn.Module:
    return RMSNorm(cfg.width) if cfg.arch == "llama" else nn.LayerNorm(cfg.width)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, use_moe: bool):
        super().__init__()
        llama = cfg.arch == "llama"
        ffn_activation = "swiglu" if llama else "gelu"
        self.ln1 = _norm(cfg)
        self.attn = SelfAttention(cfg.width, cfg.heads, cfg.dropout, kv_heads=cfg.kv_heads, bias=not llama)
        self.ln2 = _norm(cfg)
        self.ffn = (MoE(cfg.width, cfg.ffn_hidden, cfg.moe, cfg.dropout, shared_activation=ffn_activation) if use_moe
                    else FeedForward(cfg.width, cfg.ffn_hidden, cfg.dropout, activation=ffn_activation))

    def forward(self, x, attn_mask, is_causal, token_kind, cache, layer, rope=None):
        x = x + self.attn(self.ln1(x), attn_mask, is_causal, cache, layer, rope=rope)
        h = self.ln2(x)
        return x + (self.ffn(h, token_kind) if isinstance(self.ffn, MoE) else self.ffn(h))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.max_positions = max_positions
        self.tok_emb = nn.Embedding(vocab_size, cfg.width)
        # llama: positions enter through RoPE in every attention layer instead.
        self.pos_emb = nn.Embedding(max_positions, cfg.width) if cfg.arch == "gpt" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i in cfg.moe_layer_indices) for i in range(cfg.depth))
        self.ln_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.width, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * depth), so
        # the stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.proj.weight", "w2_EHD", "shared.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.depth))
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                nn.init.normal_(block.ffn.w1_EDF, std=0.02)
                nn.init.normal_(block.ffn.gate.weight, std=0.02)
                if block.ffn.noise is not None:
                    nn.init.zeros_(block.ffn.noise.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: torch.Tensor | None = None, token_kind: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """embeds: (B, T, D) new positions; position_ids: (B, T); attn_mask: bool (B, 1, T, S)
        over all S visible keys, or None for a plain causal mask. Returns hidden states (B, T, D)."""
        assert cache is None or attn_mask is not None, "cached decoding needs an explicit mask"
        rope = None
        if self.pos_emb is not None:
            embeds = embeds + self.pos_emb(position_ids)
        else:
            rope = rope_cos_sin(position_ids, self.cfg.width // self.cfg.heads, self.cfg.rope_theta, embeds.dtype)
        x = self.drop(embeds)
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, attn_mask is None, token_kind, cache, layer, rope)
        if cache is not None:
            cache.advance(embeds.size(1))
        return self.ln_f(x)
