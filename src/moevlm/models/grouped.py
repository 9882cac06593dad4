"""The experts' two matmuls over assignments sorted by expert, with a hand-written backward.

Rows of ``x_AD`` are grouped by expert (group e holds ``counts_E[e]`` rows); expert e applies
``act(x @ w1_EDF[e] + b1_EF[e]) @ w2_EHD[e] + b2_ED[e]`` to its group. ``torch._grouped_mm``
does all groups in one call where the device and dtype support it; elsewhere a loop over
contiguous slices does the same. Autograd through per-expert slices of the stacked weights
would materialise a full-sized zero gradient per slice and add them up (most of the MoE
backward on CPU); this backward writes each expert's gradient once. ``MoE.experts_reference``
in moe.py is the plain version the tests compare against.

Activations: ``gelu`` (F = H), ``gelu_tanh`` (F = H, GELU's tanh approximation: GPT-2's and
Phi's ``gelu_new``) and ``swiglu`` (F = 2H: gate and up projections side by side, [gate | up],
``silu(gate) * up``, as in Llama and Mixtral experts).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs (forward and the transposed forms backward needs)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(32, 16, device=device_type, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        torch._grouped_mm(a, w, offs=offs)
        torch._grouped_mm(a.t(), a, offs=offs)
        torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _bounds(counts_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = counts_E.cumsum(0).tolist()  # the loop path's one host sync per call
    return list(zip([0] + ends[:-1], ends))


def grouped_matmul(x_AI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Row group e of x times w_EIO[e]: (A, I) -> (A, O)."""
    if use_grouped:
        return torch._grouped_mm(x_AI, w_EIO, offs=counts_E.cumsum(0).to(torch.int32))
    out = x_AI.new_empty(x_AI.size(0), w_EIO.size(2))
    for e, (start, end) in enumerate(_bounds(counts_E)):
        if end > start:
            torch.mm(x_AI[start:end], w_EIO[e], out=out[start:end])
    return out


def grouped_weight_grad(x_AI: torch.Tensor, g_AO: torch.Tensor, counts_E: torch.Tensor,
                        use_grouped: bool) -> torch.Tensor:
    """Per group e: x_e^T @ g_e, stacked (E, I, O); zero for an empty group."""
    if use_grouped:
        return torch._grouped_mm(x_AI.t(), g_AO, offs=counts_E.cumsum(0).to(torch.int32))
    out = x_AI.new_zeros(counts_E.numel(), x_AI.size(1), g_AO.size(1))
    for e, (start, end) in enumerate(_bounds(counts_E)):
        if end > start:
            torch.mm(x_AI[start:end].t(), g_AO[start:end], out=out[e])
    return out


def _gather_bias(t_AF: torch.Tensor) -> bool:
    """One gather of the biases (no host sync) on a GPU and for small tensors; per-expert
    slices on a CPU once an (A, F) temporary no longer fits in cache (measured: 7 % faster
    at 2048 x 1024, 7 % slower at 528 x 512)."""
    return t_AF.is_cuda or t_AF.numel() < 1 << 21


def _add_bias(t_AF: torch.Tensor, b_EF: torch.Tensor, expert_A: torch.Tensor, counts_E: torch.Tensor) -> None:
    """t_AF[a] += b_EF[expert_A[a]], in place."""
    if _gather_bias(t_AF):
        t_AF += b_EF[expert_A]
        return
    for e, (start, end) in enumerate(_bounds(counts_E)):
        t_AF[start:end] += b_EF[e]


def _bias_grad(g_AF: torch.Tensor, expert_A: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    if _gather_bias(g_AF):
        return g_AF.new_zeros(counts_E.numel(), g_AF.size(1)).index_add_(0, expert_A, g_AF)
    return torch.stack([g_AF[start:end].sum(0) for start, end in _bounds(counts_E)])


# The two-matrix activations with biases, and the ``approximate`` F.gelu takes for each.
GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def activate(pre_AF: torch.Tensor, activation: str) -> torch.Tensor:
    """The experts' activation on w1's output (..., F): GELU, or silu(gate) * up for swiglu."""
    return _activate(pre_AF, activation)[0]


def _activate(pre_AF: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activation, and for swiglu silu(gate), kept so the backward need not recompute it."""
    if activation in GELU_APPROXIMATE:
        return F.gelu(pre_AF, approximate=GELU_APPROXIMATE[activation]), None
    gate, up = pre_AF.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return silu_gate * up, silu_gate


def _activation_grad(grad_AH: torch.Tensor, pre_AF: torch.Tensor, silu_gate_AH: torch.Tensor | None,
                     activation: str) -> torch.Tensor:
    if activation in GELU_APPROXIMATE:
        return torch.ops.aten.gelu_backward(grad_AH, pre_AF, approximate=GELU_APPROXIMATE[activation])
    gate, up = pre_AF.chunk(2, dim=-1)
    grad_pre_AF = torch.empty_like(pre_AF)
    grad_gate, grad_up = grad_pre_AF.chunk(2, dim=-1)  # written in place: no concatenation
    torch.ops.aten.silu_backward.grad_input(grad_AH * up, gate, grad_input=grad_gate)
    torch.mul(grad_AH, silu_gate_AH, out=grad_up)
    return grad_pre_AF


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, expert_A, counts_E, w1_EDF, b1_EF, w2_EHD, b2_ED, activation, use_grouped):
        pre_AF = grouped_matmul(x_AD, w1_EDF, counts_E, use_grouped)
        if b1_EF is not None:
            _add_bias(pre_AF, b1_EF, expert_A, counts_E)
        act_AH, silu_gate_AH = _activate(pre_AF, activation)
        out_AD = grouped_matmul(act_AH, w2_EHD, counts_E, use_grouped)
        if b2_ED is not None:
            _add_bias(out_AD, b2_ED, expert_A, counts_E)
        ctx.save_for_backward(x_AD, expert_A, counts_E, w1_EDF, w2_EHD, pre_AF, act_AH, silu_gate_AH)
        ctx.activation, ctx.use_grouped = activation, use_grouped
        ctx.has_bias = b1_EF is not None, b2_ED is not None
        return out_AD

    @staticmethod
    def backward(ctx, grad_AD):
        x_AD, expert_A, counts_E, w1_EDF, w2_EHD, pre_AF, act_AH, silu_gate_AH = ctx.saved_tensors
        grouped = ctx.use_grouped
        grad_AD = grad_AD.contiguous()
        grad_w2 = grouped_weight_grad(act_AH, grad_AD, counts_E, grouped)
        grad_act_AH = grouped_matmul(grad_AD, w2_EHD.transpose(1, 2), counts_E, grouped)
        grad_pre_AF = _activation_grad(grad_act_AH, pre_AF, silu_gate_AH, ctx.activation)
        grad_w1 = grouped_weight_grad(x_AD, grad_pre_AF, counts_E, grouped)
        grad_x = grouped_matmul(grad_pre_AF, w1_EDF.transpose(1, 2), counts_E, grouped) \
            if ctx.needs_input_grad[0] else None
        grad_b1 = _bias_grad(grad_pre_AF, expert_A, counts_E) if ctx.has_bias[0] else None
        grad_b2 = _bias_grad(grad_AD, expert_A, counts_E) if ctx.has_bias[1] else None
        return grad_x, None, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def expert_mlp(x_AD: torch.Tensor, expert_A: torch.Tensor, counts_E: torch.Tensor, w1_EDF: torch.Tensor,
               b1_EF: torch.Tensor | None, w2_EHD: torch.Tensor, b2_ED: torch.Tensor | None,
               activation: str = "gelu", use_grouped: bool | None = None) -> torch.Tensor:
    """x_AD sorted by expert (``expert_A`` non-decreasing, ``counts_E`` rows each) -> (A, D).

    ``use_grouped`` None picks torch._grouped_mm where the device and dtype support it.
    """
    device_type = x_AD.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom Function is not autocast: run it in the autocast dtype; .to() carries the
        # gradients back to the fp32 weights.
        dtype = torch.get_autocast_dtype(device_type)
        x_AD, w1_EDF, w2_EHD = x_AD.to(dtype), w1_EDF.to(dtype), w2_EHD.to(dtype)
        b1_EF = None if b1_EF is None else b1_EF.to(dtype)
        b2_ED = None if b2_ED is None else b2_ED.to(dtype)
    if use_grouped is None:
        # _grouped_mm wants every row stride to be a multiple of 16 bytes. Under torch.compile
        # its shape function accepts only CUDA bf16, and the probe must not be traced.
        aligned = all(n * x_AD.element_size() % 16 == 0 for n in (*w1_EDF.shape[1:], w2_EHD.size(1)))
        if torch.compiler.is_compiling():
            use_grouped = aligned and device_type == "cuda" and x_AD.dtype == torch.bfloat16
        else:
            use_grouped = aligned and grouped_mm_supported(device_type, x_AD.dtype)
    return _ExpertMLP.apply(x_AD, expert_A, counts_E, w1_EDF, b1_EF, w2_EHD, b2_ED, activation, use_grouped)
