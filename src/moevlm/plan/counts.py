"""Parameter counts of a config's model, exact: the model built on the meta device (no weights, no
memory; a pretrained part from its config.json only), frozen for its stage as training freezes it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moevlm.config import Config
from moevlm.models.factory import build_model
from moevlm.models.lora import apply_lora
from moevlm.models.moe import MoE
from moevlm.train.distributed import repeated_blocks
from moevlm.train.expert_parallel import EXPERT_PARAMETERS
from moevlm.train.stages import freeze_for_stage


@dataclass
class Block:
    """One block of a stack: its parameters and what the backward needs of it. ``grad``: ``train`` (it
    has trainable weights), ``through`` (frozen, but a gradient passes through it to trainable
    weights before it) or ``none`` (no gradient reaches it: it keeps no activations)."""
    stack: str  # vision | decoder
    params: int
    trainable: int
    grad: str
    moe: bool
    trainable_outside_moe: int = 0  # stage moe: the attention around a learning MoE layer is frozen


@dataclass
class Counts:
    params: int = 0
    trainable: int = 0
    experts: int = 0  # routed experts' weights: what expert parallelism splits
    experts_trainable: int = 0
    root: int = 0  # outside the repeated blocks: FSDP2's root unit, gathered for the whole step
    root_trainable: int = 0
    blocks: list[Block] = field(default_factory=list)

    @property
    def largest_block(self) -> int:
        return max((b.params for b in self.blocks), default=0)

    @property
    def largest_trainable_block(self) -> int:
        return max((b.trainable for b in self.blocks), default=0)


def meta_model(config: Config) -> nn.Module:
    """``config``'s model (a prepared config: sources resolved, vocabulary set) on the meta device."""
    with torch.device("meta"):
        model = build_model(config.model, load_weights=False)
        if config.model.decoder.lora_rank:
            apply_lora(model.lm, config.model.decoder)
    freeze_for_stage(model, config.train)
    return model


def count(model: nn.Module) -> Counts:
    """Counts of a model whose parameters are frozen for its stage (tied weights counted once)."""
    counts = Counts()
    experts = {id(getattr(layer, name)) for layer in model.modules() if isinstance(layer, MoE)
               for name in EXPERT_PARAMETERS if getattr(layer, name, None) is not None}
    vision = {id(p) for p in model.vision.parameters()}
    in_moe = {id(p) for layer in model.modules() if isinstance(layer, MoE) for p in layer.parameters()}
    block_of = {id(p): block for block in repeated_blocks(model) for p in block.parameters()}
    seen_blocks: dict[int, Block] = {}
    flowing = False  # a trainable weight runs before this point of the forward: gradients pass here
    for _, param in model.named_parameters():  # registration order is forward order: tower, projector, LM
        n, learns = param.numel(), param.requires_grad
        counts.params += n
        counts.trainable += n * learns
        if id(param) in experts:
            counts.experts += n
            counts.experts_trainable += n * learns
        block = block_of.get(id(param))
        if block is None:
            counts.root += n
            counts.root_trainable += n * learns
            flowing |= learns
            continue
        entry = seen_blocks.get(id(block))
        if entry is None:
            entry = Block("vision" if id(param) in vision else "decoder", 0, 0, "none",
                          any(isinstance(m, MoE) for m in block.modules()))
            seen_blocks[id(block)] = entry
            counts.blocks.append(entry)
        entry.params += n
        entry.trainable += n * learns
        entry.trainable_outside_moe += n * (learns and id(param) not in in_moe)
        flowing |= learns
        if flowing:
            entry.grad = "train" if entry.trainable else "through"
    return counts
