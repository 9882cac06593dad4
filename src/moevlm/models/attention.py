"""Multi-head self-attention with fused QKV on F.scaled_dot_product_attention, and a KV cache.

Follows nanoGPT's CausalSelfAttention: one Linear makes q, k and v for every head at once and
the heads are batched with view/transpose, never looped over. Scores are scaled by
1/sqrt(head size) inside SDPA (the seed scaled by the model width, a known fault).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.models.rope import apply_rope


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

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """A cache writing into the given buffers, one (batch, heads, max_len, head_dim) per layer,
        from slot 0: the prefill of a ``StaticKVCache``."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.max_len, cache.length = keys, values, keys[0].size(2), 0
        return cache


class StaticKVCache:
    """Keys and values of a compiled decoding step (moevlm.compiled): preallocated for a fixed batch
    and length and written in place, one position per step, at ``slot`` ((1,) long, a tensor so a
    compiled step never sees a new Python value and never recompiles). Every step reads all
    ``max_len`` slots; the caller's key mask hides those not written yet. One tensor per layer: the
    compiled step writes each in place, where writes into views of one stacked tensor made inductor
    copy the whole of it per layer and step (batch 8 ran slower than eager).

    Same interface as ``KVCache`` for the decoder (``update``, ``advance``); ``prefill_view`` is a
    ``KVCache`` over the same buffers for the eager prefill, after which ``slot`` is set to its length."""

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.max_len = max_len

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.slot]

    def prefill_view(self) -> KVCache:
        return KVCache.over(self.keys, self.values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.slot, k.to(keys.dtype))  # autocast may hand over bf16 keys
        values.index_copy_(2, self.slot, v.to(values.dtype))
        return keys, values

    def advance(self, num_positions: int) -> None:
        self.slot.add_(num_positions)


class SelfAttention(nn.Module):
    """``kv_heads`` < ``heads``: grouped-query attention (Ainslie et al. 2023), each key/value head
    shared by heads / kv_heads query heads. The fused qkv rows are [q (heads * hs) | k (kv_heads *
    hs) | v (kv_heads * hs)], the order transformers' q_proj / k_proj / v_proj split into."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, kv_heads: int | None = None,
                 bias: bool = True):
        super().__init__()
        assert width % heads == 0
        self.heads = heads
        self.kv_heads = heads if kv_heads is None else kv_heads
        assert heads % self.kv_heads == 0
        self.head_dim = width // heads
        self.kv_width = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(width, width + 2 * self.kv_width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0, num_queries: int | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, C). attn_mask: bool (B, 1, T, S), True where a query may see a key.
        ``num_queries``: only the first that many positions ask (every position is still a key
        and value); the output is then (B, num_queries, C). ``rope``: cos and sin (B, T, hs)
        rotating q and k (models/rope.py) before k enters the cache."""
        B, T, C = x.shape
        hs, kv = self.head_dim, self.kv_width
        if num_queries is None:
            q, k, v = self.qkv(x).split([C, kv, kv], dim=2)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :num_queries], weight[:C], None if bias is None else bias[:C])
            k, v = F.linear(x, weight[C:], None if bias is None else bias[C:]).split(kv, dim=2)
        Tq = q.size(1)
        q = q.view(B, Tq, self.heads, hs).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.kv_heads, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.kv_heads, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:, :Tq], sin[:, :Tq]), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs), S = cached + T
        # enable_gqa only when grouped: the plain path stays the exact kernel call it always was.
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, **gqa)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)  # re-assemble heads side by side
        return self.proj(y)
