"""Activation checkpointing (``train.activation_checkpointing``): blocks that keep only their inputs
for the backward pass and run their forward again to get the rest.

- ``full``: every block of every stack (the ViT's and the decoder's blocks, a transformers tower's
  encoder layers and LM's decoder layers) keeps only its input.
- ``selective``: only the feed-forward sub-block of each block (``mlp``/``ffn``: the dense MLP or
  the MoE layer) is recomputed; the attention keeps its activations. The feed-forward holds most of
  a block's activations (a SwiGLU MLP four F-wide tensors against attention's few D-wide ones; an
  MoE layer k copies of its tokens, the experts' hidden states and fp32 router scores), and its
  recompute costs matmuls linear in the sequence length, where recomputing attention would cost
  work that grows with its square.

The block's own ``forward`` is replaced on the instance, so parameter names, state dicts and
checkpoints stay as they are, and DDP's and FSDP2's hooks (on ``__call__``) stay outside the
recomputed region: under FSDP2 a block's weights are gathered once for its backward, recompute
included. Non-reentrant ``torch.utils.checkpoint`` restores the CPU RNG and that of the inputs'
device before the recompute, so router noise and dropout draw what they drew in the forward.

A block through which no gradient flows (a frozen tower with nothing trainable before it, under
the pretrain and instruct stages) keeps no activations anyway: it runs plainly, not checkpointed.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moevlm.config.schema import ACTIVATION_CHECKPOINTING
from moevlm.models.moe_install import MoEMLP

FEED_FORWARD = ("mlp", "ffn")  # a block's feed-forward child: transformers' layers and ours


def stack_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every stack of ``model`` (items of a ModuleList that hold parameters), outermost
    only: a block's own lists (transformers' expert lists) are recomputed with the block."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if any(True for _ in block.parameters()):
                blocks.append(block)
                inside.update(id(m) for m in block.modules())
    return blocks


def checkpointed_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """What ``mode`` recomputes: whole blocks (full), or each block's feed-forward child (selective;
    the whole block where it has none)."""
    assert mode in ACTIVATION_CHECKPOINTING, mode
    if mode == "none":
        return []
    blocks = stack_blocks(model)
    if mode == "full":
        return blocks
    return [next((getattr(block, name) for name in FEED_FORWARD if isinstance(getattr(block, name, None), nn.Module)),
                 block) for block in blocks]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint what ``mode`` names, in place, before DDP or FSDP2 wraps the model; returns how many
    modules now recompute their forward (a second call changes nothing)."""
    modules = checkpointed_modules(model, mode)
    for module in modules:
        if not is_checkpointed(module):
            assert "forward" not in vars(module), f"{type(module).__name__} already has its own forward"
            module.forward = types.MethodType(_checkpointed_forward, module)
    return len(modules)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``apply_activation_checkpointing`` made ``module`` recompute its forward."""
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def _needs_grad(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The module's own forward, checkpointed where a gradient flows through it."""
    forward = type(self).forward
    if not torch.is_grad_enabled() or not (_needs_grad(args) or _needs_grad(kwargs.values())
                                           or _needs_grad(self.parameters())):
        return forward(self, *args, **kwargs)
    if torch.compiler.is_compiling():  # compiled: the recompute replays the traced graph, no Python state
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    # early_stop=False: the recompute runs the whole forward, so its collectives (expert parallelism's
    # all-to-all, the MoE statistics summed over ranks) run on every rank alike.
    return checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=True, early_stop=False,
                      context_fn=lambda: _recompute_context(self), **kwargs)


def _recompute_context(module: nn.Module):
    """(forward, recompute) contexts: the token kinds that installed MoE layers read during the
    forward (``TokenKinds``, set for the length of one LM call) are set again for the recompute,
    which runs in the backward, after that call has ended."""
    kinds = {id(m.kinds): m.kinds for m in module.modules() if isinstance(m, MoEMLP)}.values()
    return contextlib.nullcontext(), _given_again([(each, each._current) for each in kinds])


@contextlib.contextmanager
def _given_again(kinds_now: list):
    with contextlib.ExitStack() as stack:
        for kinds, current in kinds_now:
            stack.enter_context(kinds.given(current))
        yield
