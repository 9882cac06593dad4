"""A vocabulary-parallel LM head under FSDP2: each rank keeps its slice of the head's vocabulary rows
and never gathers the head whole in training.

FSDP2 would gather the whole head (vocabulary x width: 250 MiB for a 32,000-token vocabulary at
width 2,048, and as much again for its all-gather buffer) at the end of the forward, when every
activation of the step is alive: the peak of a rank. Here the head's weight is a DTensor of the
rows ``Shard(0)`` gives (FSDP2's own split of it, so checkpoints read and reshard it as any
FSDP2 weight), left out of FSDP2's hands, and the training loss is computed as Megatron's
vocabulary-parallel cross-entropy, with one difference: FSDP's ranks hold different rows of the
batch, not the same ones, so the labelled positions' hidden states of every rank are gathered first
(a few KiB: the answer tokens only). Then each rank computes the logits of every rank's positions
for its vocabulary slice, and three all-reduces (the row maximum; then the sum of exponentials,
the target's logit from the rank whose slice holds it, and the sum of the logits that label
smoothing needs) give each position's cross-entropy, the same on every rank; each rank keeps its
own positions' mean. In backward the gradients of the positions' losses are summed over the ranks
(each rank has its own), each rank's slice gives its logits' gradient, and the hidden states'
gradients (each rank's slice contributes to every position) are summed over the ranks and each
rank keeps its own positions'. Equal to the whole head, float rounding aside
(tests/train/test_vocab_parallel.py).

Evaluation and generation (the model in eval mode) call the head module instead: it gathers the
weight whole there, as FSDP2 would, with no activations kept. A head tied to the input embedding
(which needs the whole table for its lookups), one with a bias, or a transformers LM whose logits
are more than the head's matmul (soft-capping, scaling: only the model types in ``PLAIN_HEADS``
qualify) keep FSDP2's path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moevlm.errors import MoevlmError

# transformers causal LMs whose forward computes the logits as the head's matmul alone.
PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def vocab_rows(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """The rows [start, stop) of a ``vocab``-row head that ``rank`` of ``size`` holds: those
    ``Shard(0)`` (and FSDP2) give it, ``ceil(vocab / size)`` each, the last rank fewer."""
    step = -(-vocab // size)
    return min(rank * step, vocab), min((rank + 1) * step, vocab)


def _plain_head(model: nn.Module) -> tuple[nn.Linear | None, object]:
    """The model's untied, bias-free linear LM head and how to put another module in its place
    (None where there is none such)."""
    lm = getattr(model, "lm", None)
    if isinstance(lm, nn.Module):
        head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
        if getattr(lm.config, "model_type", None) not in PLAIN_HEADS:
            return None, None
        replace = lm.set_output_embeddings
    else:
        decoder = getattr(model, "decoder", None)
        head, embedding = getattr(decoder, "lm_head", None), getattr(decoder, "tok_emb", None)
        replace = lambda module: setattr(decoder, "lm_head", module)  # noqa: E731
    if type(head) is not nn.Linear or head.bias is not None or embedding is None or head.weight is embedding.weight:
        return None, None
    return head, replace


def shard_vocabulary(model: nn.Module, mesh) -> nn.Parameter | None:
    """Replace ``model``'s LM head by a ``VocabParallelHead`` on ``mesh`` (one dimension: FSDP's ranks)
    and fill in ``model.head_loss``; its weight, to be left out of FSDP2 (None: the head stays)."""
    head, replace = _plain_head(model)
    size = mesh.size()
    if head is None or vocab_rows(head.out_features, size - 1, size)[0] >= head.out_features:
        return None  # a vocabulary too small for every rank to hold rows keeps the plain head
    sharded = VocabParallelHead(head.weight, mesh)
    replace(sharded)
    model.head_loss = sharded.loss
    return sharded.weight


class VocabParallelHead(nn.Module):
    """An LM head holding this rank's vocabulary rows (``weight``: a DTensor sharded on dim 0)."""

    def __init__(self, weight: nn.Parameter, mesh):
        super().__init__()
        self.vocab_size, self.width = weight.shape
        self.group, self.rank, self.world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        self.first, last = vocab_rows(self.vocab_size, self.rank, self.world)
        # A copy, so the whole weight (when the model was built whole) is freed with the old head.
        rows = weight.detach()[self.first:last].clone()
        self.weight = nn.Parameter(DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=weight.shape,
                                                      stride=weight.stride()), requires_grad=weight.requires_grad)

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole logits (evaluation, generation): the weight gathered whole, as FSDP2 would."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            raise MoevlmError("a vocabulary-parallel LM head learns through the training loss only (the model's "
                              "head_loss, in training mode with labels); its whole logits carry no gradient")
        return F.linear(hidden, self.weight.full_tensor().to(hidden.dtype))

    @torch.compiler.disable  # collectives inside autograd functions: run eagerly under train.compile
    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``HeadLoss``: hidden (N, D) and labels (N,) at this rank's labelled positions -> the logits
        of this rank's vocabulary slice at them (N, V_r), and the mean cross-entropy over them."""
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # Every rank must run the backward's collectives, also one whose positions carry no
            # gradient (a frozen LM and no image in its rows).
            hidden = hidden.detach().requires_grad_()
        counts = _counts(hidden.size(0), hidden.device, self.group, self.world)
        every = _GatherRows.apply(hidden, counts, self.rank, self.group)
        targets = _gather(labels, counts, self.group)
        rows = self.weight.to_local()
        if rows.requires_grad:
            # Every rank's positions reach this slice at once, so its gradient is already the sum
            # over the ranks of their losses' gradients; FSDP2 averages the other weights' over them.
            rows.register_hook(lambda grad: grad / self.world)
        logits = F.linear(every, rows.to(every.dtype))
        losses = _VocabParallelCrossEntropy.apply(logits, targets, self.first, self.vocab_size, label_smoothing,
                                                  self.group)
        own = slice(sum(counts[:self.rank]), sum(counts[:self.rank + 1]))
        return logits[own], losses[own].mean()


def _counts(rows: int, device: torch.device, group, world: int) -> list[int]:
    """The number of positions of every rank."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows], device=device), group=group)
    return [int(count) for count in counts]


def _gather(rows: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Every rank's ``rows`` (counts[r] of them on rank r), in rank order."""
    padded = rows.new_zeros(max(1, *counts), *rows.shape[1:])
    padded[:rows.size(0)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    """Every rank's hidden states; in backward, their gradients summed over the ranks (each rank's
    vocabulary slice contributes to every position), of which each rank keeps its own rows'."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.own, ctx.group = slice(sum(counts[:rank]), sum(counts[:rank + 1])), group
        return _gather(rows, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.own], None, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy (label smoothing as ``F.cross_entropy``'s) of each position from this rank's
    vocabulary slice of the logits (N, V_r), rows [first, first + V_r) of the vocabulary; the same
    (N,) losses on every rank."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, first: int, vocab: int, smoothing: float,
                group) -> torch.Tensor:
        z = logits.float()
        top = z.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(z - top[:, None])
        here = (targets >= first) & (targets < first + z.size(1))  # this slice holds the target
        index = (targets - first).clamp(0, z.size(1) - 1)
        target = z.gather(1, index[:, None]).squeeze(1) * here
        sums = torch.stack([exp.sum(-1), target, z.sum(-1)])
        dist.all_reduce(sums, group=group)
        losses = top + sums[0].log() - (1 - smoothing) * sums[1] - smoothing / vocab * sums[2]
        ctx.save_for_backward(exp / sums[0][:, None], index, here)
        ctx.smoothing, ctx.vocab, ctx.group, ctx.dtype = smoothing, vocab, group, logits.dtype
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, index, here = ctx.saved_tensors
        grad = grad.float().contiguous().clone()  # each rank has its own positions' gradients: all of them
        dist.all_reduce(grad, group=ctx.group)
        dz = probs - ctx.smoothing / ctx.vocab
        dz.scatter_add_(1, index[:, None], -(1 - ctx.smoothing) * here[:, None].to(dz.dtype))
        return (dz * grad[:, None]).to(ctx.dtype), None, None, None, None, None
