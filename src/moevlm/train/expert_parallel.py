"""Expert parallelism (``dist.expert_parallel``): a parallel plan applied to a built model.

Each process of an expert-parallel (EP) group of R processes holds E / R of every MoE layer's
experts; every token's rows travel to the processes holding its chosen experts and back with
two ``all_to_all_single`` exchanges (the counts first, so every process knows what it receives).
Dropless: an expert computes every row sent to it, however uneven the loads. Gradients flow
back through the same exchanges. The models stay free of ``torch.distributed``: the plan
replaces each layer's expert weights by this process's slice and installs its own
``compute_experts`` on the instance (the seam ``MoE.compute_experts`` leaves for it).

Groups: the W processes form W / R EP groups of consecutive ranks; the processes at the same
position of their EP groups hold the same experts and form a replica group (data parallel for
the experts, as DDP / FSDP are for every other weight).

Tensor names carry their shapes, as in models/moe.py (N tokens, D width, E experts, K top-k,
A this process's assignments), and:
    R  processes in the EP group          L  experts held here, E / R: global ids [r * L, (r + 1) * L)
    M  rows this process's experts compute: what it receives from every process, itself included
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from moevlm.errors import ConfigError
from moevlm.models.grouped import expert_mlp
from moevlm.models.moe import MoE
from moevlm.models.protocol import VisionLanguageModel

# The stacked expert parameters of an MoE layer (the biases are None for swiglu).
EXPERT_PARAMETERS = ("w1_EDF", "b1_EF", "w2_EHD", "b2_ED")


def expert_parallel_groups(degree: int, device_type: str = "cpu"):
    """(mesh, EP group, replica group) of this process, out of the default group of W processes.

    The mesh is W / degree x degree, dims ("replica", "ep"): EP groups are its rows, ranks
    [0, degree), [degree, 2 * degree) ...; the replica group is this process's column (None when
    degree == W). Checkpoints describe the expert slices on it (train/dist_checkpoint.py). Every
    process must call this, in the same order."""
    world = dist.get_world_size()
    if degree < 1 or world % degree:
        raise ConfigError(f"dist.expert_parallel={degree} must divide the number of processes ({world})")
    mesh = init_device_mesh(device_type, (world // degree, degree), mesh_dim_names=("replica", "ep"))
    return mesh, mesh.get_group("ep"), mesh.get_group("replica") if degree < world else None


def apply_expert_parallel(model: VisionLanguageModel, ep_group: dist.ProcessGroup) -> set[str]:
    """Shards every MoE layer's experts over ``ep_group`` and installs the exchanging dispatch.

    The model's weights must be identical on all processes before (the trainer seeds them, or
    loads the same checkpoint): each keeps its slice of the same stacked tensors. Call it before
    wrapping the model in DDP / FSDP and building the optimizer: the sliced parameters are new
    ``nn.Parameter`` objects. They keep their names (state-dict keys unchanged), with shapes
    (L, ...). Returns the fully qualified names of the sharded parameters: the trainer keeps
    them out of DDP / FSDP and averages their gradients with ``sync_expert_grads``."""
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    module_names = {id(module): name for name, module in model.named_modules()}
    for layer in model.moe_layers:  # every layer checked before any is changed
        if layer.cfg.num_experts % size:
            raise ConfigError(f"dist.expert_parallel={size} must divide moe.num_experts ({layer.cfg.num_experts})")
    sharded = set()
    for layer in model.moe_layers:
        L = layer.cfg.num_experts // size
        prefix = module_names[id(layer)]
        for attr in EXPERT_PARAMETERS:
            full = getattr(layer, attr)
            if full is None:
                continue
            local = full.detach()[rank * L:(rank + 1) * L].clone()
            setattr(layer, attr, nn.Parameter(local, requires_grad=full.requires_grad))
            sharded.add(f"{prefix}.{attr}" if prefix else attr)
        layer.compute_experts = functools.partial(compute_experts_parallel, layer, ep_group)
    return sharded


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; the backward sends each row's gradient
    back to the process the row came from (the same exchange with the splits swapped).

    Written here rather than taken from torch.distributed.nn.functional, whose version warns
    that it is deprecated (torch 2.13), or from the private _functional_collectives."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, receive: list[int], send: list[int], group: dist.ProcessGroup):
        ctx.receive, ctx.send, ctx.group = receive, send, group
        return _all_to_all(rows, receive, send, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.send, ctx.receive, ctx.group), None, None, None


def _all_to_all(rows: torch.Tensor, receive: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = rows.new_empty(sum(receive), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def compute_experts_parallel(layer: MoE, group: dist.ProcessGroup, x_ND: torch.Tensor, experts_NK: torch.Tensor,
                             weights_NK: torch.Tensor, kept_NK: torch.Tensor | None) -> torch.Tensor:
    """``MoE.compute_experts`` over the EP group: (N, D), as the single-process layer computes.

    Every process of the group must call it in lockstep, even with no token (N = 0) and under
    ``torch.no_grad``: the exchanges are collectives, so there is no local shortcut."""
    E, K = layer.cfg.num_experts, layer.cfg.top_k
    R = dist.get_world_size(group)
    L = E // R
    # 1. This process's assignments sorted by global expert, which sorts them by destination
    #    (expert e lives on group rank e // L); stable, so each expert's rows keep token order.
    experts_A = experts_NK.reshape(-1)
    order_A = experts_A.argsort(stable=True)
    token_A, expert_A, weight_A = order_A // K, experts_A[order_A], weights_NK.reshape(-1)[order_A]
    if kept_NK is not None:  # over capacity (training): these assignments go nowhere
        kept_A = kept_NK.reshape(-1)[order_A]
        token_A, expert_A, weight_A = token_A[kept_A], expert_A[kept_A], weight_A[kept_A]
    counts_E = torch.bincount(expert_A, minlength=E)
    # 2. Counts first: received_RL[s, l] = the rows group rank s sends to local expert l.
    received_RL = torch.empty_like(counts_E).view(R, L)
    dist.all_to_all_single(received_RL, counts_E, group=group)
    send_R = counts_E.view(R, L).sum(1).tolist()
    receive_R = received_RL.sum(1).tolist()
    # 3. The rows to their experts' processes.
    x_MD = _Exchange.apply(x_ND.index_select(0, token_A), receive_R, send_R, group)
    # 4. Received rows come source-major (rank s's rows for l = 0 .. L-1, then rank s + 1's);
    #    the experts want them expert-major: a stable sort by local expert.
    local_M = torch.arange(L, device=x_ND.device).repeat(R).repeat_interleave(received_RL.reshape(-1))
    regroup_M = local_M.argsort(stable=True)
    out_MD = expert_mlp(x_MD.index_select(0, regroup_M), local_M[regroup_M], received_RL.sum(0), layer.w1_EDF,
                        layer.b1_EF, layer.w2_EHD, layer.b2_ED, layer.cfg.activation)
    # 5. Back to source-major order, and each row home.
    out_MD = out_MD.new_empty(out_MD.shape).index_copy(0, regroup_M, out_MD)
    out_AD = _Exchange.apply(out_MD, send_R, receive_R, group)
    # 6. Weighted sum of each token's experts, as MoE.experts_sorted.
    y_ND = torch.zeros_like(x_ND, dtype=out_AD.dtype)
    return y_ND.index_add_(0, token_A, out_AD * weight_A.unsqueeze(1).to(out_AD.dtype))


def _parameters(model: nn.Module, names: set[str]) -> list[tuple[str, nn.Parameter]]:
    """The named parameters in sorted order: the same order on every process (a set's order
    depends on the process's hash seed), so their collectives pair up."""
    params = dict(model.named_parameters())
    return [(name, params[name]) for name in sorted(names)]


def sync_expert_grads(model: nn.Module, names: set[str], replica_group: dist.ProcessGroup | None,
                      world_size: int) -> None:
    """Turns the sharded experts' gradients into the global gradient, as DDP does the others.

    The contract with the trainer: each of the W processes backpropagates its share of the
    global loss (the shares sum to it) times W, and DDP averages the other gradients (/ W). An
    expert's gradient on a process then holds W times the gradient of its EP group's shares
    (the exchanges bring back the gradients of the rows it computed for the others): summed
    over the replica group and divided by W, it is the gradient of the global loss. ``model``
    is the unwrapped model ``apply_expert_parallel`` returned ``names`` for."""
    reduce = replica_group is not None and dist.get_world_size(replica_group) > 1
    for _, param in _parameters(model, names):
        if not param.requires_grad:
            continue
        if param.grad is None:  # no backward went through the layer: zeros, so the all-reduces still pair up
            param.grad = torch.zeros_like(param)
        if reduce:
            dist.all_reduce(param.grad, group=replica_group)
        param.grad.div_(world_size)


def local_experts(full: dict[str, torch.Tensor], names: set[str],
                  ep_group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """This process's slices of full (E, ...) tensors (a single-process checkpoint's weights or
    optimizer moments), to load into a model ``apply_expert_parallel`` sharded."""
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    out = {}
    for name in sorted(names):
        tensor = full[name]
        assert tensor.size(0) % size == 0, f"{name}: {tensor.size(0)} experts over {size} processes"
        L = tensor.size(0) // size
        out[name] = tensor[rank * L:(rank + 1) * L].clone()
    return out
