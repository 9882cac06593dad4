"""Multi-head self-attention with fused QKV on F.scaled_dot_product_attention, and a KV cache.

Follows nanoGPT's CausalSelfAttention: one Linear makes q, k and v for every head at once and
the heads are batched with view/transpose, never looped over. Scores are scaled by
1/sqrt(head size) inside SDPA (the seed scaled by the model width, a known fault).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of every decoder layer, preallocated for the whole generation.

    ``length`` counts the positions already written; a forward over T new positions writes
    slots ``length .. length+T`` in every layer and then calls ``advance(T)``.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (num_layers, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.length, k.size(2)).copy_(k)  # narrow + copy_: far cheaper than slice assignment
        values.narrow(2, self.length, v.size(2)).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, num_positions: int) -> None:
        self.length += num_positions


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0, num_queries: int | None = None) -> torch.Tensor:
        """x: (B, T, C). attn_mask: bool (B, 1, T, S), True where a query may see a key.
        ``num_queries``: only the first that many positions ask (every position is still a key
        and value); the output is then (B, num_queries, C)."""
        B, T, C = x.shape
        if num_queries is None:
            q, k, v = self.qkv(x).split(C, dim=2)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :num_queries], weight[:C], bias[:C])
            k, v = F.linear(x, weight[C:], bias[C:]).split(C, dim=2)
        Tq = q.size(1)
        q = q.view(B, Tq, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)  # re-assemble heads side by side
        return self.proj(y)
