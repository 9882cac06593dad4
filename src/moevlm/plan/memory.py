"""Per-rank bytes of a training run: weights, gradients, optimizer state, what DDP or FSDP2 adds, and
activations; whether that fits a GPU (or, with ``device="cpu"``, a host) and the largest batch that does.

Model states, per rank (P: parameters it holds, T: the trainable ones among them):
- one process or DDP: every rank holds every parameter; FSDP2: 1/N of each (N ranks); routed experts
  under expert parallelism (degree ep > 1): 1/ep of them, on either strategy (kept out of DDP and FSDP).
- weights 4 P (fp32: under bf16 they are the master copy the optimizer updates); gradients 4 T; AdamW
  8 T (two fp32 moments), 4 T more with ``train.ema_decay`` (the weight average).
- DDP adds its fp32 gradient buckets (4 T outside the experts), and bf16 autocast caches a bf16 copy
  of each trainable weight for the forward (2 T).
- FSDP2 gathers whole units: the root (everything outside the repeated blocks: embeddings, head,
  projector, norms) for the whole step, two blocks at once (the running one and the prefetched next),
  and one block's unsharded gradients (fp32, plus bf16 before the reduction in mixed precision).

The peak comes at the start of the backward, with every activation still kept and the head's gradient
made, or at its end, with every gradient made and the activations gone:
    peak = weights + optimizer + unit buffers + max(activations + root gradients, gradients).
A CUDA device also keeps a reserve: its context, NCCL's buffers and the allocator's fragmentation
(1 GiB + 10 % of the card). On the CPU the figure is the process's resident memory above what the
imports took, which also holds the kernels' code and scratch that a first training step brings in
(``CPU_RUNTIME``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from moevlm.config import Config
from moevlm.errors import ConfigError
from moevlm.models.hf_config import resolve_pretrained
from moevlm.plan.activations import MODES, activation_bytes, row_shape
from moevlm.plan.counts import Counts, count, meta_model
from moevlm.train.run import prepare_config
from moevlm.train.stages import moe_layers_to_train

# A scratch model's vocabulary comes from its tokenizer, trained on the data; without data: a char
# tokenizer has at most this many entries (bytes), a BPE one tokenizer.vocab_size.
CHAR_VOCAB = 256
GiB = 1024 ** 3
# What the first training step of a minute model (one block, 8 wide) adds to a process's resident
# memory on the CPU besides its tensors: code pages and scratch of the kernels it runs
# (benchmarks/plan_check.py measures it as its "runtime" row; torch 2.13, Linux).
CPU_RUNTIME = 94 * 1024 ** 2
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 1024, "MIB": 1024 ** 2, "GIB": GiB, "TIB": 1024 ** 4, "K": 1024, "M": 1024 ** 2, "G": GiB}


def parse_bytes(text: str) -> int:
    """'80GB', '80 GiB', '24G', '512MiB' -> bytes (GB: 10^9, GiB and G: 2^30); ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a positive size such as 80GB, 24GiB or 512MB")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass
class Row:
    strategy: str  # one process | ddp | fsdp
    expert_parallel: int
    checkpointing: str
    weights: float
    gradients: float
    optimizer: float
    buffers: float  # DDP buckets and autocast copies, or FSDP2's gathered units; on the CPU, CPU_RUNTIME
    activations: float  # at the per-rank batch
    peak: float
    fits: bool
    max_batch: int  # the largest per-rank batch that fits (0: not even one row)


@dataclass
class Plan:
    config: Config
    counts: Counts
    world_size: int
    batch_per_rank: int
    seq_len: int
    memory: int
    usable: float
    device: str
    rows: list[Row]


def planned_config(config: Config) -> Config:
    """The run's config as training completes it (sources read, stage's MoE layers) with a vocabulary."""
    # Sizes from the sources first: stage moe upcycles every layer of the LM, as many as it has.
    resolved = dataclasses.replace(config, model=resolve_pretrained(config.model))
    layers = moe_layers_to_train(resolved, [])
    if layers != resolved.model.decoder.moe_layer_indices:
        config = config.updated({"model.decoder.depth": resolved.model.decoder.depth,
                                 "model.decoder.moe.layers": layers})
    config = prepare_config(config)
    if config.model.tokenizer.kind != "hf" and not config.model.decoder.vocab_size:
        vocab = CHAR_VOCAB if config.model.tokenizer.kind == "char" else config.model.tokenizer.vocab_size
        config = config.updated({"model.decoder.vocab_size": vocab})
    return config


def expert_degrees(config: Config, counts: Counts, world_size: int) -> list[int]:
    """1, and the run's dist.expert_parallel (or, where that is 1, the largest degree that divides both
    the experts and the ranks) when the model has experts."""
    if not counts.experts or world_size == 1:
        return [1]
    experts = config.model.decoder.moe.num_experts
    degree = config.dist.expert_parallel
    if degree == 1:
        degree = math.gcd(experts, world_size)
    if world_size % degree or experts % degree:
        raise ConfigError(f"dist.expert_parallel={degree} must divide the {world_size} ranks and moe.num_experts "
                          f"({experts})")
    return sorted({1, degree})


def state_bytes(config: Config, c: Counts, strategy: str, n: int, ep: int, bf16: bool) -> tuple[float, ...]:
    """(weights, gradients, optimizer, buffers, root gradients) bytes on one rank."""
    shard = n if strategy == "fsdp" else 1
    split = ep if ep > 1 else shard  # without expert parallelism the experts are sharded like the rest
    params = (c.params - c.experts) / shard + c.experts / split
    trainable = (c.trainable - c.experts_trainable) / shard + c.experts_trainable / split
    optimizer = (8 + 4 * (config.train.ema_decay > 0)) * trainable
    if strategy == "fsdp":
        unit = 2 if bf16 else 4
        buffers = (unit * c.root + 2 * unit * c.largest_block
                   + (4 + 2 * bf16) * c.largest_trainable_block + 4 * c.root_trainable)
        root_grads = 0.0  # counted in the buffers: unsharded until the step's end
    else:
        bucketed = c.trainable - c.experts_trainable * (ep > 1)  # DDP leaves the split experts out
        buffers = 4 * bucketed * (strategy == "ddp") + 2 * trainable * bf16
        root_grads = 4 * c.root_trainable
    return 4 * params, 4 * trainable, optimizer, buffers, root_grads


def make_plan(config: Config, world_size: int, memory: int, device: str = "cuda",
              seq_len: int | None = None) -> Plan:
    """The plan for ``config`` (a command line's config) on ``world_size`` ranks of ``memory`` bytes."""
    if world_size < 1:
        raise ConfigError(f"--gpus must be at least 1, not {world_size}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device must be cuda or cpu, not {device!r}")
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"--seq-len must be at least 1, not {seq_len}")
    batch = config.train.batch_size
    if batch % world_size:
        raise ConfigError(f"train.batch_size {batch} must be divisible by the {world_size} ranks (each rank "
                          f"takes batch_size / world size rows)")
    config = planned_config(config)
    counts = count(meta_model(config))
    shape = row_shape(config, seq_len)
    bf16 = device == "cuda" and config.train.precision != "fp32"
    act = 2 if bf16 else 4
    usable = memory - (GiB + 0.1 * memory if device == "cuda" else 0)
    per_rank = batch // world_size
    rows = []
    strategies = ["one process"] if world_size == 1 else ["ddp", "fsdp"]
    for strategy in strategies:
        for ep in expert_degrees(config, counts, world_size):
            weights, grads, optimizer, buffers, root_grads = state_bytes(config, counts, strategy, world_size, ep,
                                                                         bf16)
            buffers += CPU_RUNTIME if device == "cpu" else 0
            fixed = weights + optimizer + buffers
            for mode in MODES:
                row_bytes = activation_bytes(config, counts, shape, mode, act)
                activations = per_rank * row_bytes
                peak = fixed + max(activations + root_grads, grads)
                room = usable - fixed - root_grads
                largest = int(room // row_bytes) if fixed + grads <= usable and row_bytes > 0 else 0
                rows.append(Row(strategy, ep, mode, weights, grads, optimizer, buffers, activations, peak,
                                peak <= usable, max(largest, 0)))
    return Plan(config, counts, world_size, per_rank, shape.decoder_tokens, memory, usable, device, rows)

