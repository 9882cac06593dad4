"""One process of tests/train/test_expert_parallel.py, started by torchrun over gloo: 2 processes
(most checks) or 4 (EP groups and replica groups both of 2).

Every check runs its collectives first and only measures afterwards (no assertion here), so a
wrong result cannot leave the other process waiting in a collective: each process writes what
it measured (largest differences from the single-process layer, loads, error messages) to
OUT/rank<r>.json and the test asserts on them.

usage: python -m torch.distributed.run --standalone --nproc_per_node=2|4 expert_parallel_worker.py OUT
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moevlm.config import MoEConfig, load_config
from moevlm.errors import ConfigError
from moevlm.models.moe import MoE
from moevlm.models.vlm import VLM
from moevlm.train.distributed import World, clip_gradients
from moevlm.train.expert_parallel import (
    apply_expert_parallel,
    expert_parallel_groups,
    local_experts,
    sync_expert_grads,
)

WIDTH, HIDDEN = 8, 6


class OneLayer(nn.Module):
    """The smallest model apply_expert_parallel takes: one MoE layer in ``moe_layers``."""

    def __init__(self, layer: MoE):
        super().__init__()
        self.moe = layer

    @property
    def moe_layers(self) -> list[MoE]:
        return [self.moe]


def make_layer(activation: str, num_experts: int = 4, capacity_factor: float | None = None) -> OneLayer:
    """The same float64 layer on every process, routed unevenly: feature 0 of every token is 2
    (see tokens()), so expert 0 takes almost every token and expert 3 none."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, top_k=2, router_noise=False, activation=activation,
                    capacity_factor=capacity_factor)
    layer = MoE(WIDTH, HIDDEN, cfg).double()
    for param in layer.parameters():
        nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        layer.gate.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, -30.0, 0.0][:num_experts])
    return OneLayer(layer)


def tokens(counts: list[int], seed: int) -> list[torch.Tensor]:
    """Every process's tokens (B=1, T=count, D), the same on every process."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(1, n, WIDTH, generator=gen, dtype=torch.float64) for n in counts]
    for part in parts:
        part[..., 0] = 2.0
    return parts


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max()) if got.numel() else 0.0


def step(model: OneLayer, x: torch.Tensor, seed: int, scale: float, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of loss = sum(y * c) * scale; returns y and x's gradient."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model.moe(x)
    c = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    ((y * c).sum() * scale).backward()
    return y.detach(), x.grad


def compare_training(activation: str, counts: list[int], groups, capacity_factor=None, bf16=False) -> dict:
    """One training step of the EP layer against the single-process layer on every part.

    The global loss is the sum of the parts' losses; the reference computes it part by part
    (capacity is per process, as each process drops from its own tokens). Each process
    backpropagates its share times W; the gate's gradient is averaged as DDP would. bf16: an
    fp32 layer under bf16 autocast (the exchanged rows are bf16)."""
    ep_group, replica_group = groups
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = make_layer(activation, capacity_factor=capacity_factor).train()
    if bf16:
        reference.float()
    model = copy.deepcopy(reference)
    names = apply_expert_parallel(model, ep_group)
    parts = [part.to(reference.moe.gate.weight.dtype) for part in tokens(counts, seed=len(counts) + sum(counts))]
    want, load_E, dropped = [], 0, 0
    for i, part in enumerate(parts):
        want.append(step(reference, part, seed=100 + i, scale=1.0, bf16=bf16))
        load_E, dropped = load_E + reference.moe.last_load.sum(0), dropped + int(reference.moe.last_dropped)
    got_y, got_dx = step(model, parts[rank], seed=100 + rank, scale=world, bf16=bf16)
    dist.all_reduce(model.moe.gate.weight.grad)
    model.moe.gate.weight.grad /= world
    sync_expert_grads(model, names, replica_group, world)
    L = model.moe.cfg.num_experts // dist.get_world_size(ep_group)
    first = dist.get_rank(ep_group) * L
    params, reference_params = dict(model.named_parameters()), dict(reference.named_parameters())
    out = {"names": sorted(names), "load": load_E.tolist(), "dropped": dropped,
           "shapes": {name: list(params[name].shape) for name in sorted(names)}}
    compared = {"forward": (got_y, want[rank][0]), "input_grad": (got_dx / world, want[rank][1]),
                "gate_grad": (model.moe.gate.weight.grad, reference.moe.gate.weight.grad)}
    compared |= {f"grad {name}": (params[name].grad, reference_params[name].grad[first:first + L])
                 for name in sorted(names)}
    for key, (got, expected) in compared.items():
        out[key] = max_diff(got, expected)
        out[f"largest {key}"] = float(expected.abs().max()) if expected.numel() else 0.0
    return out


def compare_inference(activation: str, calls: list[list[int]], groups) -> dict:
    """Eval-mode forwards under no_grad (validation, generation), some with no token here; the
    last under inference_mode (the server's)."""
    rank = dist.get_rank()
    reference = make_layer(activation).eval()
    model = copy.deepcopy(reference)
    apply_expert_parallel(model, groups[0])
    diffs, loads = [], []
    for i, counts in enumerate(calls):
        with torch.inference_mode() if i == len(calls) - 1 else torch.no_grad():
            parts = tokens(counts, seed=7 + i)
            # The single-process layer's few-token path fails on no token at all (torch.stack of
            # nothing): there the answer is the empty (1, 0, D).
            want = reference.moe(parts[rank]) if counts[rank] else parts[rank].clone()
            diffs.append(max_diff(model.moe(parts[rank]), want))
            loads.append(model.moe.last_load.sum(0).tolist())
    return {"forward": max(diffs), "loads": loads}


def checkpoint_round_trip(groups) -> dict:
    ep_group = groups[0]
    reference = make_layer("gelu")
    model = copy.deepcopy(reference)
    names = apply_expert_parallel(model, ep_group)
    full = {name: param.detach() for name, param in reference.named_parameters() if name in names}
    params = dict(model.named_parameters())
    back = local_experts(full, names, ep_group)
    return {"keys_unchanged": set(model.state_dict()) == set(reference.state_dict()),
            "local_equal": all(torch.equal(back[n], params[n].detach()) for n in names),
            "names": sorted(back)}


def whole_model(groups) -> dict:
    """The tiny preset's VLM under DDP over both processes, its experts kept out of DDP and
    sharded: names found through the module tree, logits, every gradient and the gradient norm.
    Each process has its own batch; the single-process gradients are the reference's on each
    batch, summed."""
    ep_group, replica_group = groups
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("tiny", overrides=["decoder.vocab_size=23", "decoder.moe.router_noise=false"])
    torch.manual_seed(0)
    reference = VLM(cfg.model).double().train()
    model = copy.deepcopy(reference)
    names = apply_expert_parallel(model, ep_group)
    # Before wrapping: DDP must neither broadcast rank 0's expert slices nor average their grads.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    ddp = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 23, (2, 5), generator=gen)
    logits = {}
    for net, scale in ((reference, 1.0), (ddp, world)):
        logits[scale] = net(images, ids).logits
        c = torch.randn(logits[scale].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        ((logits[scale] * c).sum() * scale).backward()
    sync_expert_grads(model, names, replica_group, world)
    params = dict(model.named_parameters())
    world_of = World(rank=rank, size=world, expert_parallel=dist.get_world_size(ep_group), ep_group=ep_group)
    norm = clip_gradients(list(params.values()), float("inf"), world_of, {params[name] for name in names})
    size, position = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    expert_diffs, other_diffs, totals = [], [], []
    for name, param in reference.named_parameters():
        if param.grad is None:
            continue
        total = param.grad.clone()
        dist.all_reduce(total)
        totals.append(total)
        if name in names:
            L = total.size(0) // size
            expert_diffs.append(max_diff(params[name].grad, total[position * L:(position + 1) * L]))
        else:
            other_diffs.append(max_diff(params[name].grad, total))
    return {"names": sorted(names), "logits": max_diff(logits[world].detach(), logits[1.0].detach()),
            "expert_grads": max(expert_diffs), "other_grads": max(other_diffs), "other_count": len(other_diffs),
            "grad_norm": float(norm), "single_process_grad_norm": float(torch.nn.utils.get_total_norm(totals)),
            "local_grad_norm": float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])),
            "state_dict_has_names": names <= set(model.state_dict())}


def errors(groups) -> dict:
    out = {}
    try:
        expert_parallel_groups(3)
    except ConfigError as error:
        out["world"] = str(error)
    try:
        apply_expert_parallel(make_layer("gelu", num_experts=5), groups[0])
    except ConfigError as error:
        out["experts"] = str(error)
    return out


def two_processes() -> dict:
    ep2 = expert_parallel_groups(2)[1:]
    ep1 = expert_parallel_groups(1)[1:]
    results = {"sizes": {"ep2": [dist.get_world_size(ep2[0]), ep2[1] is None],
                         "ep1": [dist.get_world_size(ep1[0]), dist.get_world_size(ep1[1])]}}
    for activation in ("gelu", "swiglu"):
        results[f"train {activation}"] = compare_training(activation, [7, 3], ep2)
        results[f"train {activation} zero tokens"] = compare_training(activation, [5, 0], ep2)
        results[f"eval {activation}"] = compare_inference(activation, [[6, 2], [1, 0], [0, 0], [0, 4]], ep2)
    results["train capacity"] = compare_training("gelu", [9, 4], ep2, capacity_factor=1.0)
    results["train bf16"] = compare_training("gelu", [7, 3], ep2, bf16=True)
    results["train degree 1"] = compare_training("gelu", [7, 3], ep1)
    results["checkpoint"] = checkpoint_round_trip(ep2)
    results["model"] = whole_model(ep2)
    results["errors"] = errors(ep2)
    return results


def four_processes() -> dict:
    """Two EP groups of 2 with replica groups of 2 (both dimensions), and one EP group of 4
    (one expert per process)."""
    ep2 = expert_parallel_groups(2)[1:]
    ep4 = expert_parallel_groups(4)[1:]
    results = {"sizes": {"ep2": [dist.get_world_size(ep2[0]), dist.get_world_size(ep2[1])],
                         "ep4": [dist.get_world_size(ep4[0]), ep4[1] is None]}}
    for degree, groups in ((2, ep2), (4, ep4)):
        results[f"train {degree}"] = compare_training("gelu", [7, 3, 0, 5], groups)
        results[f"eval {degree}"] = compare_inference("swiglu", [[1, 0, 3, 2], [0, 0, 0, 0]], groups)
    return results


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    results = two_processes() if dist.get_world_size() == 2 else four_processes()
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
