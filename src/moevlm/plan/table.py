"""The plan as a readable table (``moevlm plan``)."""

from __future__ import annotations

from moevlm.plan.memory import GiB, Plan


def _gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def render(plan: Plan) -> str:
    c, cfg = plan.counts, plan.config
    where = "GPU" if plan.device == "cuda" else "host (CPU, fp32)"
    precision = "fp32" if plan.device == "cpu" or cfg.train.precision == "fp32" else "bf16 mixed precision"
    lines = [
        f"model: {c.params:,} parameters, {c.trainable:,} trainable (stage {cfg.train.stage}), "
        f"{c.experts:,} in routed experts; largest block {c.largest_block:,}",
        f"run: {plan.world_size} rank(s), {plan.batch_per_rank} row(s) of {plan.seq_len} tokens per rank, "
        f"{precision}",
        f"memory per rank: {_gib(plan.memory)} GiB {where}, {_gib(plan.usable)} GiB usable"
        + (" (1 GiB + 10 % kept for CUDA context, NCCL and fragmentation)" if plan.device == "cuda" else ""),
        "",
        "GiB per rank:",
    ]
    header = ["strategy", "ep", "checkpointing", "weights", "grads", "optimizer", "buffers", "activations", "peak",
              "fits", "max batch/rank"]
    table = [header] + [[r.strategy, str(r.expert_parallel), r.checkpointing, _gib(r.weights), _gib(r.gradients),
                         _gib(r.optimizer), _gib(r.buffers), _gib(r.activations), _gib(r.peak),
                         "yes" if r.fits else "no", str(r.max_batch)] for r in plan.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        # Text columns left-aligned, figures right-aligned.
        cells = [cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
