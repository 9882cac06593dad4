"""The best validation so far (``train.select``) and early stopping (``train.patience``).

The record lives in the trainer state (trainer_state.json) as ``best = {"step", "metric", "value"}``
and ``validations_since_best``, so a resumed run goes on comparing with the same best and counting
from the same point. Inference finds the best snapshot through that record (moevlm/checkpoint/run_folder.py,
``resolve_checkpoint``).
"""

from __future__ import annotations

import math

# train.select -> the key of evaluate()'s result
_RESULT_KEY = {"val_loss": "loss", "exact_match": "exact_match", "bleu4": "bleu4"}
_LOWER_IS_BETTER = {"val_loss"}


class Selection:
    """Compares each validation with the best so far; ``state``: the trainer state to go on from."""

    def __init__(self, metric: str, patience: int | None, state: dict):
        self.metric, self.patience = metric, patience
        self.best: dict | None = state.get("best")
        self.since_best: int = state.get("validations_since_best", 0)

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best["step"]

    def update(self, step: int, result: dict) -> bool:
        """Record the validation of ``step``; True when it is a new best (a tie keeps the earlier step)."""
        value = float(result[_RESULT_KEY[self.metric]])
        if self._better(value):
            self.best, self.since_best = {"step": step, "metric": self.metric, "value": value}, 0
            return True
        self.since_best += 1
        return False

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):  # a NaN loss is never the best
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if self.metric in _LOWER_IS_BETTER else value > self.best["value"]

    def stop_reason(self) -> str | None:
        """Why training stops early now, or None."""
        if self.patience is None or self.since_best < self.patience:
            return None
        best = (f"best: step {self.best['step']}, {self.metric} {self.best['value']:.4f}" if self.best
                else f"no finite {self.metric} yet")
        return (f"stopped early: no new best {self.metric} in {self.since_best} validations "
                f"(train.patience={self.patience}); {best}")

    def state(self) -> dict:
        """The keys for the trainer state; none before the first validation (as without a validation set)."""
        if self.best is None and self.since_best == 0:
            return {}
        return {"best": self.best, "validations_since_best": self.since_best}
