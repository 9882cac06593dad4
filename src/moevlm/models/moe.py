"""Sparse Mixture-of-Experts feed-forward layer with noisy top-k routing.

References: noisy top-k gating (Shazeer et al. 2017, as in the seed notebook); Switch
Transformer / GShard load-balancing loss (Fedus et al. 2021); router z-loss (ST-MoE, Zoph et
al. 2022); stacked expert weights with sort-based dispatch (transformers v5 MoE, torchtitan).

Tensor names carry their shapes (torchtitan style):
    N  tokens in the batch (B * T, flattened)      D  model width
    E  experts                                     H  expert hidden width
    F  w1's columns: H, or 2H for swiglu (gate and up side by side)
    K  experts per token (top-k)                   A  assignments, N * K (or fewer if dropped)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moevlm.config import MoEConfig
from moevlm.models.grouped import GELU_APPROXIMATE, activate, expert_mlp
from moevlm.models.mlp import FeedForward

# token_kind values: which tokens the load statistics and aux losses count.
PAD, IMAGE, TEXT = 0, 1, 2


class MoE(nn.Module):
    def __init__(self, width: int, hidden: int, cfg: MoEConfig, dropout: float = 0.0, shared_activation: str = "gelu"):
        """``shared_activation``: the shared expert's FeedForward activation (the decoder's dense
        feed-forward kind: gelu for arch gpt, swiglu for llama)."""
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.gate = nn.Linear(width, E, bias=False)
        # Noisy top-k: a learned per-expert noise scale, used only while training.
        self.noise = nn.Linear(width, E, bias=False) if cfg.router_noise else None
        # gelu / gelu_tanh experts: act(x @ w1 + b1) @ w2 + b2. swiglu experts hold gate and up
        # side by side in w1 ([gate | up], F = 2H) and have no biases, as Llama / Mixtral FFNs.
        inner = 2 * hidden if cfg.activation == "swiglu" else hidden
        self.w1_EDF = nn.Parameter(torch.empty(E, width, inner))
        self.w2_EHD = nn.Parameter(torch.empty(E, hidden, width))
        has_bias = cfg.activation in GELU_APPROXIMATE
        self.b1_EF = nn.Parameter(torch.zeros(E, inner)) if has_bias else None
        self.b2_ED = nn.Parameter(torch.zeros(E, width)) if has_bias else None
        self.shared = FeedForward(width, hidden, activation=shared_activation) if cfg.shared_expert else None
        self.dropout = nn.Dropout(dropout)
        # Filled by every forward: aux losses (scalars with grad), the token counts each expert
        # computed and the real assignments over capacity (tensors, read only when reported).
        self.aux: dict[str, torch.Tensor] = {}
        self.last_load = torch.zeros(2, E, dtype=torch.long)  # [image, text] x experts
        self.last_dropped = torch.zeros((), dtype=torch.long)
        # Sums a statistic (no grad) over the whole batch when the batch is split across processes
        # (set by moevlm.train.distributed); None: this process holds the whole batch.
        self.batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns clean router logits (N, E), chosen experts (N, K) and their weights (N, K).

        In transformers' order (Mixtral, Qwen2-MoE with norm_topk_prob): fp32 softmax over all
        experts, top-k of the probabilities, renormalised to sum 1. In exact maths that is the
        softmax of the top-k logits; computing it the same way makes near-ties pick the same
        experts as an exported model. Router noise (training) is added to the logits first."""
        logits_NE = self.gate(x_ND)
        scores_NE = logits_NE
        if self.training and self.noise is not None:
            scores_NE = logits_NE + torch.randn_like(logits_NE) * F.softplus(self.noise(x_ND))
        probs_NE = scores_NE.float().softmax(dim=-1)
        top_probs_NK, experts_NK = probs_NE.topk(self.cfg.top_k, dim=-1)
        weights_NK = (top_probs_NK / top_probs_NK.sum(dim=-1, keepdim=True)).to(x_ND.dtype)
        return logits_NE, experts_NK, weights_NK

    def forward(self, x: torch.Tensor, token_kind: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); token_kind: (B, T) with PAD / IMAGE / TEXT (None: all text).

        ``moe.capacity_factor`` applies in training only: inference is dropless (as Mixtral,
        Qwen-MoE and vLLM), so what a sequence generates does not depend on its batch.
        Eval still counts the assignments that training would drop (``last_dropped``)."""
        B, T, D = x.shape
        x_ND = x.reshape(-1, D)
        logits_NE, experts_NK, weights_NK = self.route(x_ND)
        if torch.compiler.is_compiling() and not self.training:
            # A compiled decoding step (moevlm.compiled) takes static shapes only: no load statistics
            # (bincount's size depends on the data), and ``experts_static``.
            y_ND = self.experts_static(x_ND, experts_NK, weights_NK)
        else:
            kind_N = (torch.full((B * T,), TEXT, device=x.device) if token_kind is None
                      else token_kind.reshape(-1))
            real_N = kind_N != PAD
            within_NK = None if self.cfg.capacity_factor is None else self.within_capacity(experts_NK, real_N)
            kept_NK = within_NK if self.training else None
            self._record_stats(logits_NE, experts_NK, kind_N, real_N, within_NK, kept_NK)
            y_ND = self.compute_experts(x_ND, experts_NK, weights_NK, kept_NK)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return self.dropout(y_ND.view(B, T, D))

    def compute_experts(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                        kept_NK: torch.Tensor | None) -> torch.Tensor:
        """Each token through its chosen (and kept) experts, weighted and summed: (N, D).

        The one seam for expert parallelism: ``moevlm.train.expert_parallel`` replaces it on the
        instance with a version that sends tokens to the process holding their experts."""
        if kept_NK is None and x_ND.size(0) * self.cfg.top_k <= self.cfg.num_experts and not torch.is_grad_enabled():
            return self.experts_per_token(x_ND, experts_NK, weights_NK)  # decoding a token or a few
        return self.experts_sorted(x_ND, experts_NK, weights_NK, kept_NK)

    def within_capacity(self, experts_NK: torch.Tensor, real_N: torch.Tensor) -> torch.Tensor:
        """Which assignments (N, K) keep their slot under ``moe.capacity_factor``: each expert
        takes the first ``ceil(capacity_factor * real tokens * K / E)`` real (image or text)
        assignments in flattened order (token, then slot). Padding never takes a slot, so
        neither the pads nor their number change which real tokens an expert computes."""
        N, K = experts_NK.shape
        E = self.cfg.num_experts
        experts_A = experts_NK.reshape(-1)
        real_A = real_N.repeat_interleave(K)
        # One sort puts each expert's real assignments first, in flattened order, then its pads.
        order_A = (experts_A * 2 + (~real_A).long()).argsort(stable=True)
        counts_E = torch.zeros(E, dtype=torch.long, device=experts_A.device).index_add_(
            0, experts_A, torch.ones_like(experts_A))  # bincount would sync with the host on a GPU
        starts_E = counts_E.cumsum(0) - counts_E
        rank_A = torch.arange(N * K, device=experts_A.device) - starts_E[experts_A[order_A]]
        # In float64, the ceil Python would take of the config's formula; a tensor: no host sync.
        capacity = torch.ceil(real_N.sum().double() * (self.cfg.capacity_factor * K / E))
        kept_sorted_A = real_A[order_A] & (rank_A < capacity)
        return torch.empty_like(kept_sorted_A).scatter_(0, order_A, kept_sorted_A).view(N, K)

    def experts_sorted(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                       kept_NK: torch.Tensor | None = None, use_grouped: bool | None = None) -> torch.Tensor:
        """Dispatch: sort assignments by expert, run every expert on its contiguous group
        (models/grouped.py), weighted scatter-add back to the tokens. ``kept_NK`` (bool, N x K;
        None: all) drops the other assignments. Dropless, on a GPU where torch._grouped_mm
        runs, it makes no host sync; dropping makes one (the number of kept rows)."""
        E, K = self.cfg.num_experts, self.cfg.top_k
        experts_A = experts_NK.reshape(-1)
        order_A = experts_A.argsort(stable=True)
        token_A = order_A // K
        expert_A = experts_A[order_A]
        weight_A = weights_NK.reshape(-1)[order_A]
        if kept_NK is not None:
            kept_A = kept_NK.reshape(-1)[order_A]
            token_A, expert_A, weight_A = token_A[kept_A], expert_A[kept_A], weight_A[kept_A]
        counts_E = torch.bincount(expert_A, minlength=E)
        out_AD = expert_mlp(x_ND.index_select(0, token_A), expert_A, counts_E, self.w1_EDF, self.b1_EF, self.w2_EHD,
                            self.b2_ED, self.cfg.activation, use_grouped)
        y_ND = torch.zeros_like(x_ND, dtype=out_AD.dtype)
        return y_ND.index_add_(0, token_A, out_AD * weight_A.unsqueeze(1).to(out_AD.dtype))

    def experts_per_token(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Inference on a handful of tokens (a decoding step): each token straight through its
        k experts. Sorting and grouping would cost more than the matmuls here."""
        w1, w2, b1, b2 = self.w1_EDF, self.w2_EHD, self.b1_EF, self.b2_ED
        rows = []
        for n, (experts, weights) in enumerate(zip(experts_NK.tolist(), weights_NK.to(x_ND.dtype).unbind())):
            x_1D = x_ND[n:n + 1]
            outs = []
            for e in experts:
                if b1 is None:  # swiglu
                    gate, up = torch.mm(x_1D, w1[e]).chunk(2, dim=-1)
                    outs.append(torch.mm(F.silu(gate) * up, w2[e]))
                else:
                    pre = torch.addmm(b1[e], x_1D, w1[e])
                    act = F.gelu(pre, approximate=GELU_APPROXIMATE[self.cfg.activation])
                    outs.append(torch.addmm(b2[e], act, w2[e]))
            rows.append(weights @ torch.cat(outs))
        return torch.stack(rows)

    def experts_static(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Each token through its k experts with static shapes (no sort, no host sync), for a compiled
        decoding step. With fewer assignments than experts, each assignment picks its expert's weights
        (``index_select`` on a one-element tensor); with as many or more, every expert runs on every
        token (one batched matmul per side, each expert's weights read once) and the router weights,
        zero off the chosen experts, combine them. Measured on the demo's layer (4 experts, 1 thread):
        gathering (N, K, D, F) weight copies instead was slower than eager at 1 token and 3x at 8."""
        N, K = experts_NK.shape
        E = self.cfg.num_experts
        weights_NK = weights_NK.to(x_ND.dtype)
        if N * K < E:
            rows = []
            for n in range(N):
                y_1D = 0
                for k in range(K):
                    y_1D = y_1D + weights_NK[n, k] * self.expert_picked(experts_NK[n, k].view(1), x_ND[n:n + 1])
                rows.append(y_1D)
            return torch.cat(rows)
        combine_NE = torch.zeros(N, E, dtype=x_ND.dtype, device=x_ND.device).scatter(1, experts_NK, weights_NK)
        return (self.experts_all(x_ND) * combine_NE.t().unsqueeze(-1)).sum(0)

    def expert_picked(self, e_1: torch.Tensor, x_MD: torch.Tensor) -> torch.Tensor:
        """Expert ``e_1`` ((1,) long tensor) on rows (M, D)."""
        w1_DF, b1_1F, w2_HD, b2_1D = self.expert_weights(e_1)
        pre = x_MD @ w1_DF
        if b1_1F is not None:
            pre = pre + b1_1F
        out = self.activate(pre) @ w2_HD
        return out if b2_1D is None else out + b2_1D

    def expert_weights(self, e_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                          torch.Tensor | None]:
        """Expert ``e_1``'s w1 (D, F), b1 (1, F), w2 (H, D), b2 (1, D); biases None where it has none.

        On a CPU these are views of the stacked weights at ``e_1.item()`` (in a compiled step an
        unbacked int: moevlm.compiled lets dynamo capture it), so the matmuls read the expert in
        place; ``index_select`` copied every picked expert first, half of the demo model's compiled
        step. On other devices ``index_select``: ``.item()`` would wait for the device and keep the
        step out of a CUDA graph."""
        if e_1.device.type != "cpu":
            b1 = None if self.b1_EF is None else self.b1_EF.index_select(0, e_1)
            b2 = None if self.b2_ED is None else self.b2_ED.index_select(0, e_1)
            return self.w1_EDF.index_select(0, e_1)[0], b1, self.w2_EHD.index_select(0, e_1)[0], b2
        e = self.expert_index(e_1)
        b1 = None if self.b1_EF is None else self.b1_EF[e:e + 1]
        b2 = None if self.b2_ED is None else self.b2_ED[e:e + 1]
        return self.w1_EDF[e], b1, self.w2_EHD[e], b2

    def expert_index(self, e_1: torch.Tensor) -> int:
        """``e_1.item()`` (a (1,) CPU tensor), with the bounds a compiled step needs to index by it."""
        e = e_1.item()
        torch._check(e >= 0)
        torch._check(e < self.cfg.num_experts)
        return e

    def experts_all(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: (E, N, D)."""
        pre_ENF = torch.bmm(x_ND.unsqueeze(0).expand(self.cfg.num_experts, -1, -1), self.w1_EDF)
        if self.b1_EF is not None:
            pre_ENF = pre_ENF + self.b1_EF.unsqueeze(1)
        out_END = torch.bmm(self.activate(pre_ENF), self.w2_EHD)
        return out_END if self.b2_ED is None else out_END + self.b2_ED.unsqueeze(1)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The experts' activation on w1's output (..., F)."""
        return activate(pre, self.cfg.activation)

    def _expert_reference(self, e: int, x_D: torch.Tensor) -> torch.Tensor:
        """Expert e on a row vector (D,) or rows (M, D)."""
        pre = x_D @ self.w1_EDF[e] + (0 if self.b1_EF is None else self.b1_EF[e])
        if self.cfg.activation == "gelu":
            act = F.gelu(pre)
        elif self.cfg.activation == "gelu_tanh":  # written out, as GPT-2's gelu_new
            act = 0.5 * pre * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre ** 3)))
        else:
            gate, up = pre.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return act @ self.w2_EHD[e] + (0 if self.b2_ED is None else self.b2_ED[e])

    def experts_reference(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                          kept_NK: torch.Tensor | None = None) -> torch.Tensor:
        """Plain per-token loop (slow): what ``experts_sorted`` must equal."""
        rows = []
        for n in range(x_ND.size(0)):
            y_D = torch.zeros_like(x_ND[n])
            for k in range(experts_NK.size(1)):
                if kept_NK is None or kept_NK[n, k]:
                    y_D = y_D + weights_NK[n, k] * self._expert_reference(int(experts_NK[n, k]), x_ND[n])
            rows.append(y_D)
        return torch.stack(rows)

    def _record_stats(self, logits_NE: torch.Tensor, experts_NK: torch.Tensor, kind_N: torch.Tensor,
                      real_N: torch.Tensor, within_NK: torch.Tensor | None, kept_NK: torch.Tensor | None) -> None:
        """The real assignments each expert computed, split image / text; those over capacity
        (dropped in training); in training, aux losses over the real (non-pad) tokens, from
        the router's choices before any drop."""
        E, K = self.cfg.num_experts, self.cfg.top_k
        bins_NK = kind_N[:, None] * E + experts_NK  # pads fall in bins 0 .. E-1, dropped ones in 3E
        if kept_NK is not None:
            bins_NK = bins_NK.masked_fill(~kept_NK, 3 * E)
        counts = torch.bincount(bins_NK.reshape(-1), minlength=3 * E + 1)
        self.last_load = counts[E:3 * E].view(2, E).detach()
        self.last_dropped = (torch.zeros((), dtype=torch.long, device=kind_N.device) if within_NK is None
                             else (real_N[:, None] & ~within_NK).sum())
        if not self.training:
            self.aux = {}
            return
        real_N = real_N.float()  # counts of thousands of tokens stay exact, unlike in bf16
        probs_NE = logits_NE.float().softmax(dim=-1)
        # Switch/GShard balance: E * sum_e f_e * P_e, with f_e the fraction of assignments and
        # P_e the mean router probability of expert e; equals 1 when routing is uniform.
        assigned_NE = torch.zeros_like(probs_NE).scatter_(1, experts_NK, 1.0)
        counts = torch.cat([(assigned_NE * real_N[:, None]).sum(0), real_N.sum()[None]]).detach()
        if self.batch_sum is not None:
            # f and the token count of the whole batch; P and z then hold this part's share of
            # the batch's sums, so the parts' losses add up to the whole batch's loss.
            counts = self.batch_sum(counts)
        num_real = counts[E].clamp(min=1)
        f_E = counts[:E] / (num_real * K)
        P_E = (probs_NE * real_N[:, None]).sum(0) / num_real
        balance = E * (f_E * P_E).sum()
        z = ((torch.logsumexp(logits_NE.float(), dim=-1) ** 2) * real_N).sum() / num_real
        self.aux = {"balance": balance, "z": z}
