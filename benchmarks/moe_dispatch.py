"""MoE expert dispatch variants against a dense FFN with the same active parameters.

Forward + backward of one training-mode MoE layer at the shapes `moevlm bench` uses, with the
experts run by torch._grouped_mm, by a loop over contiguous slices (the fallback), and by
plain autograd through per-expert slices of the stacked weights (what the hand-written
backward in models/grouped.py replaced). Each time is divided by the dense FFN's.

    python benchmarks/moe_dispatch.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from moevlm.bench.scenarios import MOE_SHAPES
from moevlm.config import MoEConfig
from moevlm.models.mlp import FeedForward
from moevlm.models.moe import MoE


def autograd_slices(moe: MoE, x_ND, experts_NK, weights_NK):
    """Sorted dispatch with autograd through w1_EDF[e] etc. (each slice's gradient is a full
    zero-filled (E, D, H) tensor that autograd then adds up)."""
    K = moe.cfg.top_k
    experts_A = experts_NK.reshape(-1)
    order_A = experts_A.argsort(stable=True)
    token_A = order_A // K
    counts = torch.bincount(experts_A, minlength=moe.cfg.num_experts).tolist()
    x_AD, outs, start = x_ND[token_A], [], 0
    for e, count in enumerate(counts):
        h = F.gelu(torch.addmm(moe.b1_EF[e], x_AD[start:start + count], moe.w1_EDF[e]))
        outs.append(torch.addmm(moe.b2_ED[e], h, moe.w2_EHD[e]))
        start += count
    out_AD = torch.cat(outs) * weights_NK.reshape(-1)[order_A].unsqueeze(1)
    return torch.zeros_like(x_ND).index_add_(0, token_A, out_AD)


def main() -> None:
    rounds = 7
    print(f"{'shape (tokens x width x hidden x experts x k)':<48}{'grouped_mm':>12}{'slices':>10}{'autograd':>10}")
    for shape in MOE_SHAPES:
        tokens, width, hidden, experts, k = shape
        torch.manual_seed(0)
        moe = MoE(width, hidden, MoEConfig(num_experts=experts, top_k=k)).train()
        for param in (moe.w1_EDF, moe.w2_EHD, moe.gate.weight):
            torch.nn.init.normal_(param, std=0.02)
        dense = FeedForward(width, k * hidden).train()
        x = torch.randn(tokens, width, requires_grad=True)
        grad = torch.randn_like(x)

        def variant(run_experts):
            def step():
                moe.zero_grad(set_to_none=True)
                _, experts_NK, weights_NK = moe.route(x)
                run_experts(x, experts_NK, weights_NK).backward(grad)
            return step

        runs = {"dense": lambda: (dense.zero_grad(set_to_none=True), dense(x).backward(grad)),
                "grouped_mm": variant(lambda *a: moe.experts_sorted(*a, use_grouped=True)),
                "slices": variant(lambda *a: moe.experts_sorted(*a, use_grouped=False)),
                "autograd": variant(lambda *a: autograd_slices(moe, *a))}
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                run()  # warm-up of this round, so every variant starts from the same cache state
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        dense_s = statistics.median(times["dense"])
        ratios = [statistics.median(times[name]) / dense_s for name in ("grouped_mm", "slices", "autograd")]
        label = "x".join(map(str, shape)) + f"  (dense {dense_s * 1e3:.1f} ms)"
        print(f"{label:<48}{ratios[0]:>12.2f}{ratios[1]:>10.2f}{ratios[2]:>10.2f}")


if __name__ == "__main__":
    main()
