"""Training on several processes: the process group torchrun describes, DDP or FSDP2 applied to
the model, sums over ranks, and every rank stopping together.

``torchrun`` (and SLURM, Kubernetes, Ray Train or TorchDistributor, which start the same
environment) sets RANK, WORLD_SIZE and LOCAL_RANK for each process; without them, or with a world
of one, everything here is a no-op and training runs as one process. The batch is split across the
ranks (``RankBatches``), and each rank's loss is its share of the whole batch's loss (the shares
add up to it, see ``Trainer.train_step``), so that DDP's and FSDP's mean over ranks of the
gradients, times the world size, is the gradient of the whole batch: the same update one process
computes on the same batch.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import signal
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.data import Sampler

from moevlm.config import Config
from moevlm.data.dataset import EpochBatchSampler
from moevlm.errors import ConfigError, MoevlmError
from moevlm.train.expert_parallel import apply_expert_parallel, expert_parallel_groups
from moevlm.train.vocab_parallel import shard_vocabulary


class StoppedOnAnotherRank(MoevlmError):
    """Another rank hit a user error (a bad row, a non-finite streak): this one stops with its message."""


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    expert_parallel: int = 1
    ep_group: object = None  # the ranks that split the experts between them (expert_parallel_groups)
    replica_group: object = None  # the ranks holding the same experts
    ep_mesh: object = None
    owns_group: bool = False  # joined by moevlm (closed at the end), not by the caller
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run (nccl: GPU)
    _signal: int | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (a new tensor; no gradient flows through it)."""
        if not self.active:
            return values.detach().clone()
        summed = values.detach().to(self.device, copy=True)
        dist.all_reduce(summed)
        return summed.to(values.device)

    def together(self, error: BaseException | None = None, count: int = 0) -> int:
        """Every rank calls this at the same point: the sum of ``count`` over the ranks. When a rank
        brings an error (or was sent SIGTERM), every rank stops here: that rank raises its own error,
        the others ``StoppedOnAnotherRank`` with its message (KeyboardInterrupt for a signal), so no
        rank waits forever for one that has left."""
        if not self.active:
            if error is not None:
                raise error
            return count
        status = torch.tensor([int(error is not None), int(self._signal is not None), count], dtype=torch.long,
                              device=self.device)
        dist.all_reduce(status)
        status = status.cpu()
        if status[0] == 0 and status[1] == 0:
            return int(status[2])
        messages: list = [None] * self.size
        dist.all_gather_object(messages, None if error is None else f"{error} (rank {self.rank})")
        if error is not None:
            raise error
        if status[0] == 0:
            raise KeyboardInterrupt
        raise StoppedOnAnotherRank(next(message for message in messages if message is not None))

    def catch_sigterm(self) -> None:
        """SIGTERM (a scheduler's preemption, a kill) is noted and acted on at the next ``together``,
        on every rank at once."""
        if self.active and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_signal", signum))


def join_world(config: Config, device: torch.device) -> World:
    """Join the process group torchrun describes (a world of one: nothing to join), with
    ``config``'s backend and timeout (the command line's: before any checkpoint is read); or
    the one the caller already joined."""
    if dist.is_available() and dist.is_initialized():  # set up by the caller (Ray Train does)
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    backend = config.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        world.device = rank_device(device, world)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.dist.timeout_s),
                                device_id=world.device if backend == "nccl" else None)
        world.owns_group = True
    if not world.is_main:  # rank 0 alone reports; the others say only what stops them
        logging.getLogger("moevlm").setLevel(logging.ERROR)
    world.catch_sigterm()
    return world


def configure_world(world: World, config: Config, device: torch.device) -> None:
    """Check the run's config against the world, and form the expert-parallel groups."""
    degree = config.dist.expert_parallel
    if not world.active:
        if degree > 1:
            raise ConfigError(f"dist.expert_parallel={degree} needs {degree} or a multiple of {degree} processes: "
                              f"start with torchrun --nproc_per_node={degree} -m moevlm train ...")
        return
    if world.size % degree:
        raise ConfigError(f"dist.expert_parallel={degree} must divide the {world.size} ranks")
    if config.train.batch_size % world.size:
        raise ConfigError(f"train.batch_size={config.train.batch_size} is the batch over all {world.size} ranks: it "
                          f"must be a multiple of {world.size} (each rank takes batch_size / {world.size})")
    world.expert_parallel = degree
    if degree > 1:
        world.ep_mesh, world.ep_group, world.replica_group = expert_parallel_groups(degree, device.type)


def rank_device(device: torch.device, world: World) -> torch.device:
    """The GPU of this rank's LOCAL_RANK when training on CUDA under torchrun."""
    if world.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def close_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        gc.collect()  # wrappers (DDP's reducer) that used the group go first
        dist.destroy_process_group()


def strategy_for(config: Config, model: nn.Module, device: torch.device) -> str:
    """``dist.strategy``, with ``auto`` resolved: DDP while fp32 weights, gradients and the two AdamW
    moments (16 bytes a trainable parameter, 4 a frozen one) take at most half a rank's memory."""
    if config.dist.strategy != "auto":
        return config.dist.strategy
    needed = sum(p.numel() * (16 if p.requires_grad else 4) for p in model.parameters())
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return "ddp" if needed <= memory // 2 else "fsdp"


def mixed_precision_dtype(config: Config, device: torch.device, strategy: str, expert_parallel: int) -> torch.dtype:
    """``dist.mixed_precision`` resolved: the dtype FSDP2 gathers and computes the weights in (they
    stay fp32 in their shards and in the optimizer; gradients are reduced in fp32). ``auto``: bf16
    under FSDP on a CUDA device that has it, else fp32. DDP keeps fp32 weights (bf16 there is
    ``train.precision``'s autocast), and FSDP leaves expert-parallel experts out, unconverted: bf16
    is refused for both."""
    choice = config.dist.mixed_precision
    if choice == "bf16" and strategy != "fsdp":
        raise ConfigError(f"dist.mixed_precision=bf16 applies to dist.strategy=fsdp, not {strategy}: set "
                          f"dist.mixed_precision=fp32 (train.precision=bf16 gives bf16 autocast)")
    if choice == "bf16" and expert_parallel > 1:
        raise ConfigError(f"dist.mixed_precision=bf16 does not reach the experts of dist.expert_parallel="
                          f"{expert_parallel} (FSDP leaves them out): set dist.mixed_precision=fp32 "
                          f"(train.precision=bf16 gives bf16 autocast)")
    if choice == "bf16" or (choice == "auto" and strategy == "fsdp" and expert_parallel == 1
                            and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The layers of every stack (the ViT's and the decoder's blocks, a transformers model's
    ``layers``): what FSDP2 shards one at a time, so only one layer's weights are gathered at once."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList)
            for block in module if any(True for _ in block.parameters())]


def large_matrices(block: nn.Module) -> list[nn.Module]:
    """A block's linear layers holding a fifth of its weights or more (a Llama layer's three
    feed-forward matrices, a ViT block's two): on the CPU, FSDP units of their own inside the block's,
    so that a layer is gathered a matrix at a time. A unit's weights are held twice while they are
    copied out of the all-gather buffer; at the backward's first layer, with every activation alive,
    a whole TinyLlama-1.1B-shaped layer and its buffer (2 x 168 MiB) made a rank's peak."""
    total = sum(p.numel() for p in block.parameters())
    return [m for m in block.modules() if isinstance(m, nn.Linear) and m.weight.numel() * 5 >= total]


def embedding_tables(model: nn.Module) -> list[nn.Module]:
    """A transformers LM's input embedding and LM head when untied: sharded as units of their own,
    so each is gathered only while it computes (in the root unit, which FSDP keeps gathered from
    the forward through the backward, the two tables of a 32,000-token vocabulary at width 2,048
    would hold 0.5 GB on every rank for the whole step). Tied, they stay in the root unit."""
    lm = getattr(model, "lm", None)
    if not isinstance(lm, nn.Module):
        return []
    tables = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    if any(table is None for table in tables) or tables[0].weight is tables[1].weight:
        return []
    return tables


@dataclass
class Parallel:
    """What ``parallelize`` did to a model: the module training steps call, the strategy, and the
    expert parameters each rank holds a slice of (kept out of DDP's and FSDP's hands)."""
    forward: nn.Module
    strategy: str
    expert_names: set[str] = field(default_factory=set)

    def no_sync(self, last: bool):
        """Gradient accumulation: DDP averages gradients only on the last micro-batch of a step."""
        if self.strategy == "ddp" and not last:
            return self.forward.no_sync()
        return contextlib.nullcontext()


def parallelize(model: nn.Module, world: World, config: Config, device: torch.device,
                unused_parameters: bool = False) -> Parallel:
    """Split ``model``'s experts (dist.expert_parallel), then wrap it in DDP or shard it with FSDP2,
    in place. Frozen parameters never enter DDP's all-reduce (DDP skips them) and are sharded
    like the rest under FSDP, so no ``find_unused_parameters`` is needed, except where a rank's
    batch may hold no image at all (``unused_parameters``: text-only rows), which leaves the vision
    tower without gradients on that step."""
    if not world.active:
        return Parallel(model, "none")
    for layer in getattr(model, "moe_layers", []):
        layer.batch_sum = world.sum
    expert_names: set[str] = set()
    if world.expert_parallel > 1:
        expert_names = apply_expert_parallel(model, world.ep_group)
    strategy = strategy_for(config, model, device)
    if strategy == "ddp":
        mixed_precision_dtype(config, device, strategy, world.expert_parallel)  # refuses bf16
        if expert_names:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_names))
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            find_unused_parameters=unused_parameters)
        return Parallel(forward, strategy, expert_names)
    # Activation checkpointing (train/checkpointing.py) is already in the blocks' forward: each
    # block's FSDP unit gathers its weights once for the backward, recompute included.
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision_dtype(config, device, strategy, world.expert_parallel),
                                  reduce_dtype=torch.float32)
    mesh = init_device_mesh(world.device.type, (world.size,))
    params = dict(model.named_parameters())
    ignored = {params[name] for name in expert_names}
    # An untied LM head is split by vocabulary rows outside FSDP2 (train/vocab_parallel.py): never gathered whole.
    head = shard_vocabulary(model, mesh)
    if head is not None:
        ignored.add(head)
    # On the CPU a block's large matrices are units inside its unit; CUDA keeps one unit a block
    # (fewer, larger all-gathers, overlapped with compute).
    units = [unit for block in repeated_blocks(model)
             for unit in (large_matrices(block) if device.type == "cpu" else []) + [block]]
    units += [table for table in embedding_tables(model) if table.weight is not head]
    for block in units:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in ignored} or None,
                    mp_policy=policy)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None, mp_policy=policy)
    for method in ("prefill", "step"):  # generation (validation) calls these, not forward
        register_fsdp_forward_method(model, method)
    if device.type == "cpu":
        gather_one_unit_at_a_time(model, units)
    return Parallel(model, strategy, expert_names)


def gather_one_unit_at_a_time(model: nn.Module, units: list[nn.Module]) -> None:
    """On the CPU, each FSDP unit holds its gathered weights only while it computes. FSDP2's
    defaults are made for CUDA streams, which overlap a unit's all-gather with the compute before
    it: in forward it keeps each all-gather's buffer (the unit's whole weights once more) until the
    next unit has gathered, and in backward it starts gathering the next unit while the current
    one computes. The CPU has no streams to overlap, so these only add memory: at the step's peak,
    the end of the forward (every activation alive, a tied LM head gathered), the last layer's kept
    buffer; at the start of the backward, the last layer gathered beside the head. Here the buffer
    goes as soon as the weights are copied out of it (FSDP2's unshard with ``async_op``) and each
    unit's backward prefetches only itself (already gathered: nothing). The values are the same."""
    model._set_unshard_async_op(True)  # FSDPModule's documented switch (underscored in torch 2.13)
    for unit in [*units, model]:
        unit.set_modules_to_backward_prefetch([unit])


def clip_gradients(params: list[nn.Parameter], max_norm: float, world: World, expert_params: set) -> float:
    """Clip to ``max_norm`` by the norm of the whole gradient, which under FSDP is spread over the
    ranks' shards and under expert parallelism over the ranks' experts; the same on every rank."""
    shared = [p for p in params if p.grad is not None and p not in expert_params]
    experts = [p for p in params if p.grad is not None and p in expert_params]
    nothing = torch.zeros((), device=world.device)
    squares = torch.nn.utils.get_total_norm([p.grad for p in shared]) ** 2 if shared else nothing
    if hasattr(squares, "full_tensor"):  # FSDP: the norm of sharded gradients, summed over the ranks
        squares = squares.full_tensor()
    if world.ep_group is not None:
        # The replicas of an expert slice hold the same gradient: summed over one EP group only.
        local = torch.nn.utils.get_total_norm([p.grad for p in experts]) ** 2 if experts else nothing
        local = local.to(squares.device, squares.dtype)
        dist.all_reduce(local, group=world.ep_group)
        squares = squares + local
    total = squares.sqrt()
    for part in (shared, experts):  # FSDP's sharded gradients and plain expert slices do not mix in one call
        if part:
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, total)
    return float(total)


class RankBatches(Sampler):
    """This rank's part of each batch of ``sampler`` (its whole batches over all ranks): the
    batch's rows split into ``size`` near-equal consecutive parts. The position, and so resume,
    is the position of the whole batches: the same on any number of ranks."""

    def __init__(self, sampler: EpochBatchSampler, rank: int, size: int):
        self.sampler, self.rank, self.size = sampler, rank, size

    def __len__(self) -> int:
        return len(self.sampler)

    def set_position(self, epoch: int, batch: int) -> None:
        self.sampler.set_position(epoch, batch)

    def __iter__(self):
        for rows in self.sampler:
            yield np.array_split(np.asarray(rows), self.size)[self.rank].tolist()
