"""Quantized weights for inference (``--quantize``), swapped into a loaded model's decoder.

``int8``: weight-only, symmetric, one scale per output channel: ``w ~ q * s`` with
``s = max|w_row| / 127`` (rounded up to a bf16 value) and ``q = round(w / s)`` in [-127, 127], so
each weight is off by at most ``s / 2``. Covered: every linear layer of the decoder (attention,
dense and shared-expert MLPs, the LM head; a head tied to the input embedding gets its own int8
copy while the embedding stays float, as a lookup reads one row) and the MoE experts' stacked
weights (``Int8MoE``). Routers stay float: their logits pick the experts. The vision tower and
projector stay float: they run once per image, not once per generated token.

Activations stay in their dtype. ``int8_matmul_reference`` is the plain version: dequantize, then
matmul. On the CPU a few rows at a time (decoding) go through ``torch._weight_int8pack_mm``, which
reads the int8 weights directly; it takes bf16 activations and scales, so there the input is
rounded to bf16 and the product comes back in bf16 (each scale is rounded up to a bf16 value when
quantizing, so the kernel and the reference use the same one). The kernel needs an input width that
is a multiple of 16: an ``Int8Linear`` of another width pads its weight (once) and its input (per call)
with zeros; the experts' stacks take the reference path then. With more rows the dequantized matmul
is faster (FAST_ROWS) and the reference path runs. A compiled decoding step (moevlm.compiled) takes
the same paths, ``Int8MoE``'s static ones included: inductor keeps the kernel as one call on the
int8 weights, so compiled and eager int8 decoding compute the same products.

``nf4``: bitsandbytes' 4-bit NormalFloat ``Linear4bit`` on the decoder's linear layers, CUDA only
(the weights are quantized when the model moves to the card).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.errors import ConfigError
from moevlm.models.hf_lm import PretrainedVLM
from moevlm.models.lora import merge_lora
from moevlm.models.moe import MoE
from moevlm.models.vlm import VLM

KINDS = ("int8", "nf4")
# Rows up to which _weight_int8pack_mm beats the dequantized matmul on a CPU (1-thread measurement at
# 576 x 1536: 59 vs 257 us at 1 row, 364 vs 509 at 8, 2084 vs 1481 at 32).
FAST_ROWS = 8


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each (positive, finite) float32 of x, as float32."""
    return ((x.float().view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dim: (..., N, K) -> q (..., N, K) int8, scale (..., N) bf16.

    The scale is max|w_row| / 127 rounded up to a bf16 value (at most 2^-7 more): the CPU kernel
    takes bf16 scales, and a scale it can hold exactly keeps every weight within scale / 2."""
    w = w.detach().float()
    # An all-zero row keeps q = 0 with any positive scale.
    scale = bf16_ceil((w.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny))
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale.bfloat16()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def int8_matmul_reference(x: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * s)^T + bias`` with the weight dequantized first."""
    return F.linear(x, dequantize_rows(q_NK, scale_N).to(x.dtype), bias)


HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")
FAST_DTYPES = (torch.float32, torch.bfloat16)


def fast_path_applies(x: torch.Tensor) -> bool:
    # In torch 2.13 the kernel crashes or returns garbage for an input width that is not a multiple
    # of 16 (tried: 2 .. 56 against 1 .. 70 outputs); multiples of 16 matched the reference everywhere.
    # Checked once per layer and step: kept to cheap tensor attributes (a few us of a ~40 us layer).
    width = x.size(-1)
    return HAS_KERNEL and x.is_cpu and x.dtype in FAST_DTYPES and width % 16 == 0 and x.numel() <= FAST_ROWS * width


def int8_matmul_fast(x: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU kernel on bf16-rounded activations; equals the reference on ``x.bfloat16()`` up to the
    bf16 rounding of the product (relative 2^-8)."""
    if scale_N.dtype != torch.bfloat16:  # a model cast with .float() after quantizing
        scale_N = scale_N.bfloat16()
    y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), q_NK, scale_N)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q_NK.size(0))


def int8_matmul(x: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if fast_path_applies(x):
        return int8_matmul_fast(x, q_NK, scale_N, bias)
    return int8_matmul_reference(x, q_NK, scale_N, bias)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (out, in) and one bf16 scale per output channel."""

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight_q", weight_q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # The CPU kernel needs an input width that is a multiple of 16 (fast_path_applies): a layer of
        # another width keeps a copy of its weight with zero columns up to one, and pads its input.
        self.pad = -self.in_features % 16
        self.fast_numel = FAST_ROWS * self.in_features if HAS_KERNEL else -1
        self.register_buffer("weight_q_padded", F.pad(self.weight_q, (0, self.pad)) if self.pad else None,
                             persistent=False)

    @classmethod
    def from_weight(cls, weight_NK: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls(*quantize_rows(weight_NK), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel's conditions (fast_path_applies) with the per-layer ones worked out once: at one
        # row the kernel takes ~25-100 us, so every us of Python and dispatch here shows.
        if x.numel() <= self.fast_numel and x.is_cpu and x.dtype in FAST_DTYPES:
            return self.kernel(x)
        return self.reference(x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``int8_matmul_fast`` with fewer steps: the input padded to the kernel's width, a bias added
        by type promotion (the add also converts the bf16 product back to the input's dtype)."""
        if self.pad:
            x = F.pad(x, (0, self.pad))
        scale = self.scale if self.scale.dtype == torch.bfloat16 else self.scale.bfloat16()
        rows = x.reshape(-1, x.size(-1))
        y = torch._weight_int8pack_mm(rows if rows.dtype == torch.bfloat16 else rows.to(torch.bfloat16),
                                      self.weight_q_padded if self.pad else self.weight_q, scale)
        if self.bias is not None:
            y = self.bias + y
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul_reference(x, self.weight_q, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8MoE(MoE):
    """A ``MoE`` whose experts' stacked weights are int8, made in place by ``Int8MoE.convert`` (the
    layer stays the same object: the LM's MoE wrappers and the server's router hooks keep it).

    Each expert's matrices are stored as rows of output channels, ``w1_q_EFD`` (E, F, D) and
    ``w2_q_EDH`` (E, D, H), with scales (E, F) and (E, D). Inference only (no capacity drops)."""

    @classmethod
    def convert(cls, moe: MoE) -> Int8MoE:
        q1, s1 = quantize_rows(moe.w1_EDF.transpose(1, 2))
        q2, s2 = quantize_rows(moe.w2_EHD.transpose(1, 2))
        del moe.w1_EDF, moe.w2_EHD
        moe.__class__ = cls
        moe.register_buffer("w1_q_EFD", q1.contiguous())
        moe.register_buffer("w1_scale_EF", s1)
        moe.register_buffer("w2_q_EDH", q2.contiguous())
        moe.register_buffer("w2_scale_ED", s2)
        return moe

    def expert(self, e: int | torch.Tensor, x_MD: torch.Tensor, matmul=int8_matmul) -> torch.Tensor:
        """Expert e (an int, or a (1,) long tensor: the compiled step's pick off a CPU) on rows (M, D)
        through ``matmul`` (int8_matmul or int8_matmul_reference)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.index_select(0, e)[0] if isinstance(e, torch.Tensor) else t[e]

        pre = matmul(x_MD, pick(self.w1_q_EFD), pick(self.w1_scale_EF), pick(self.b1_EF))
        return matmul(self.activate(pre), pick(self.w2_q_EDH), pick(self.w2_scale_ED), pick(self.b2_ED))

    def compute_experts(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                        kept_NK: torch.Tensor | None) -> torch.Tensor:
        """Assignments sorted by expert, each expert once on its contiguous rows, weighted scatter-add."""
        assert kept_NK is None, "int8 experts are for inference (dropless)"
        K = experts_NK.size(1)
        experts_A = experts_NK.reshape(-1)
        order_A = experts_A.argsort(stable=True)
        token_A = order_A // K
        ends = torch.bincount(experts_A, minlength=self.cfg.num_experts).cumsum(0).tolist()
        out_AD = x_ND.new_empty(token_A.size(0), x_ND.size(1))
        for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
            if end > start:
                out_AD[start:end] = self.expert(e, x_ND.index_select(0, token_A[start:end]))
        weight_A = weights_NK.reshape(-1)[order_A].to(out_AD.dtype)
        return x_ND.new_zeros(x_ND.shape, dtype=out_AD.dtype).index_add_(0, token_A, out_AD * weight_A.unsqueeze(1))

    # MoE.experts_static's two paths on the int8 rows, each matmul as in eager decoding (int8_matmul):
    # through the CPU kernel where it applies (inductor keeps it as one call on the int8 weights), else
    # dequantized.
    def expert_picked(self, e_1: torch.Tensor, x_MD: torch.Tensor) -> torch.Tensor:
        # On a CPU the int8 rows are read in place, as MoE.expert_weights reads float ones.
        return self.expert(self.expert_index(e_1) if e_1.is_cpu else e_1, x_MD)

    def experts_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        # One expert at a time on its (F, D) slab, a view: each int8 weight read once.
        return torch.stack([self.expert(e, x_ND) for e in range(self.cfg.num_experts)])

    def _expert_reference(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        # MoE.experts_reference's per-token loop, each expert slice dequantized.
        return self.expert(e, x_D.unsqueeze(0) if x_D.dim() == 1 else x_D, int8_matmul_reference).view_as(x_D)


def check_quantize(kind: str | None) -> str | None:
    """``kind`` if it names a kind of quantization (or is None); else a one-line ConfigError."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--quantize {kind}: expected one of {', '.join(KINDS)}")
    return kind


def quantize_model(model: nn.Module, kind: str, device: torch.device) -> nn.Module:
    """Swap ``kind`` (int8 or nf4) weights into the decoder of a loaded model, in place; call it
    before the model moves to ``device`` (nf4 quantizes on that move). A one-line ConfigError for a
    kind, device or model it does not cover."""
    check_quantize(kind)
    decoder = _decoder_of(model, kind)
    if model.cfg.decoder.lora_rank:  # merging is exact; quantizing then sees one weight per layer
        merge_lora(decoder)
    if kind == "nf4":
        return _quantize_nf4(model, decoder, device)
    for parent, name, child in list(_children(decoder, _linear_types(model))):
        if isinstance(child, MoE):
            Int8MoE.convert(child)
        else:
            weight, bias = _linear_weight(child)
            setattr(parent, name, Int8Linear.from_weight(weight, bias))
    return model


def _decoder_of(model: nn.Module, kind: str) -> nn.Module:
    if isinstance(model, VLM):
        return model.decoder
    if isinstance(model, PretrainedVLM):
        return model.lm
    raise ConfigError(f"--quantize {kind}: covers moevlm's own and transformers-LM models, "
                      f"not a {type(model).__name__}")


def _children(module: nn.Module, linear_types: tuple[type, ...]):
    """(parent, attribute, layer) of every linear layer and MoE layer under ``module``; a MoE's
    router stays float, its shared expert is a dense MLP like any other."""
    for name, child in module.named_children():
        if isinstance(child, MoE):
            yield module, name, child
            if child.shared is not None:
                yield from _children(child.shared, linear_types)
        elif type(child) in linear_types:
            yield module, name, child
        else:
            yield from _children(child, linear_types)


def _linear_types(model: nn.Module) -> tuple[type, ...]:
    if not isinstance(model, PretrainedVLM):
        return (nn.Linear,)
    # Lazy: transformers takes seconds to import (a PretrainedVLM has it loaded already).
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, weights stored (in, out)

    return (nn.Linear, Conv1D)


def _linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an nn.Linear or a transformers Conv1D."""
    weight = layer.weight if type(layer) is nn.Linear else layer.weight.t()
    return weight, layer.bias


def _quantize_nf4(model: nn.Module, decoder: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cuda":
        raise ConfigError(f"--quantize nf4 needs a CUDA device and bitsandbytes; this run is on {device.type} "
                          "(--quantize int8 runs anywhere)")
    if model.cfg.decoder.moe_layer_indices:
        raise ConfigError("--quantize nf4 covers linear layers only, not MoE experts; "
                          "use --quantize int8 for an MoE model")
    try:
        # Lazy: an optional CUDA-only library.
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--quantize nf4 needs bitsandbytes (pip install 'moevlm[nf4]')") from None
    for parent, name, layer in list(_children(decoder, _linear_types(model))):
        weight, bias = _linear_weight(layer)
        nf4 = bnb.nn.Linear4bit(weight.size(1), weight.size(0), bias=bias is not None, compute_dtype=torch.bfloat16,
                                quant_type="nf4", device="cpu")
        # Quantized when the model moves to the card; a tied head gets its own copy.
        nf4.weight = bnb.nn.Params4bit(weight.detach().clone().contiguous(), requires_grad=False, quant_type="nf4")
        if bias is not None:
            nf4.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        setattr(parent, name, nf4)
    return model
