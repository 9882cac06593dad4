"""Checkpoints of a run on several ranks: weights and optimizer state written with
``torch.distributed.checkpoint`` (DCP), each rank its own shard, into the checkpoint's
``sharded/`` folder; everything else as in a one-process checkpoint (moevlm/checkpoint.py).

DCP records which part of each tensor every shard holds, so the folder loads on any number of
ranks, with any strategy or degree of expert parallelism, and in one process (``caption``,
``eval``, ``export``, ``serve`` read it through ``checkpoint.load_checkpoint``). Tensors are
keyed by their names in the plain model: DDP's and FSDP2's wrapping does not show.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from moevlm.checkpoint import SHARDED
from moevlm.train import ema
from moevlm.train.distributed import World
from moevlm.train.expert_parallel import local_experts


def _as_global(tensors: dict[str, torch.Tensor], names: set[str], world: World) -> dict:
    """Expert slices as the DTensors they are parts of: the whole (E, ...) tensor to DCP."""
    if not names:
        return tensors
    # The mesh is (replica, ep): a slice is the same on its replicas, a shard of dim 0 along ep.
    return {name: DTensor.from_local(t, world.ep_mesh, [Replicate(), Shard(0)], run_check=False) if name in names else t
            for name, t in tensors.items()}


def _optimizer_tensors_as_global(state: dict, names: set[str], world: World) -> dict:
    """The AdamW moments of expert slices as DTensors too (the step count is the same everywhere)."""
    for name in names & set(state["state"]):
        moments = state["state"][name]
        state["state"][name] = _as_global(moments, {k for k, v in moments.items() if v.dim() > 0}, world)
    return state


def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, skip: set[str], world: World,
                expert_names: set[str]) -> list[str]:
    """Every rank writes its part of the weights (but ``skip``: tied copies, untrained pretrained
    tensors) and of the optimizer state into ``folder/sharded``; returns the files, as
    checksums.json names them (on rank 0; the others get [])."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    model_state = _as_global({k: v for k, v in model_state.items() if k not in skip}, expert_names, world)
    optimizer_state = _optimizer_tensors_as_global(optimizer_state, expert_names, world)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=folder / SHARDED)
    if not world.is_main:  # rank 0 lists and commits them; the folder is renamed under the others' feet
        return []
    return sorted(f"{SHARDED}/{path.name}" for path in (folder / SHARDED).iterdir())


def load_sharded_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                           expert_names: set[str], averaged: bool = False) -> None:
    """The optimizer state of a sharded checkpoint, resharded for this run (any number of ranks);
    ``averaged``: it holds a weight average too (train/ema.py), which the layout must make room for."""
    _, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill, in this run's shards
    if averaged:
        for moments in optimizer_state["state"].values():
            moments[ema.KEY] = torch.empty_like(next(v for v in moments.values() if v.dim() > 0))
    optimizer_state = _optimizer_tensors_as_global(optimizer_state, expert_names, world)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"optim": optimizer_state}, checkpoint_id=Path(folder) / SHARDED)
    for name in expert_names & set(optimizer_state["state"]):  # back to the plain slices the optimizer holds
        moments = optimizer_state["state"][name]
        optimizer_state["state"][name] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in moments.items()}
    set_optimizer_state_dict(model, optimizer, optimizer_state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The state of ``optimizer`` (built on the plain model, a one-process checkpoint's optimizer.pt
    loaded into it) keyed by parameter name, for ``load_full_optimizer`` once the model is wrapped."""
    return get_optimizer_state_dict(model, optimizer)


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World,
                        expert_names: set[str], averaged: bool = False) -> None:
    """Whole tensors keyed by name into this rank's optimizer: FSDP takes its shard of each, an expert
    parameter its slice. ``averaged``: the state holds a weight average too (train/ema.py)."""
    if averaged:  # DCP shards only the entries the optimizer's own state has: give the average one
        get_optimizer_state_dict(model, optimizer)  # fills the state, as a first step would
        for param, moments in optimizer.state.items():
            if moments:
                moments[ema.KEY] = torch.zeros_like(param)
    for name in expert_names & set(state["state"]):
        state["state"][name] = {k: local_experts({name: v}, {name}, world.ep_group)[name] if v.dim() > 0 else v
                                for k, v in state["state"][name].items()}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
