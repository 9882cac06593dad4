"""An exponential moving average of the trainable weights (``train.ema_decay``).

The average lives in the optimizer state, as each parameter's ``"ema"`` entry, so every way the
optimizer state is saved, sharded and resumed (one process, FSDP, expert slices, another world
size) carries it too. It starts at the weights after the first update; after update t >= 2

    ema = d_t * ema + (1 - d_t) * weights,   d_t = min(train.ema_decay, (1 + t) / (10 + t))

(the warm-up of d keeps the random initial weights from lingering in short runs). t counts the
updates made: a step skipped as non-finite (train/trainer.py) is none.

Validation, checkpoints and inference use the average: around them ``swapped()`` puts it into
the parameters and the training weights into the ``"ema"`` entries. A checkpoint therefore
holds the average as its model weights (what ``caption``/``eval``/``export`` read) and the
training weights in its optimizer state; ``--resume`` swaps them back (``swap``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

KEY = "ema"


def decay_at(decay: float, update: int) -> float:
    """The decay of the ``update``-th update (1-based)."""
    return min(decay, (1 + update) / (10 + update))


class WeightAverage:
    """The average of the parameters ``optimizer`` updates, with ``decay`` (0 < decay < 1)."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float):
        self.optimizer, self.decay = optimizer, decay

    def _pairs(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(parameters, their averages) per parameter group that has averages yet (a group holds
        tensors of one kind, so each pair can go through one foreach call)."""
        pairs = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if KEY in self.optimizer.state.get(p, {})]
            if params:
                pairs.append(([p.detach() for p in params], [self.optimizer.state[p][KEY] for p in params]))
        return pairs

    @torch.no_grad()
    def update(self, update: int) -> None:
        """Fold the weights after optimizer update number ``update`` (1-based) into the average."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                # AdamW fills a parameter's state at its first step; an entry put in before would
                # keep it from doing so.
                if state and KEY not in state:
                    state[KEY] = p.detach().clone()
        if update > 1:
            weight = 1 - decay_at(self.decay, update)
            for params, averages in self._pairs():
                torch._foreach_lerp_(averages, params, weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters and their averages."""
        for params, averages in self._pairs():
            for param, average in zip(params, averages):
                kept = param.clone()
                param.copy_(average)
                average.copy_(kept)

    @contextmanager
    def swapped(self):
        """The average in the parameters for the duration."""
        self.swap()
        try:
            yield
        finally:
            self.swap()
