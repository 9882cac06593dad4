"""Evaluation metrics: answer accuracy, caption BLEU and how evenly MoE layers use their experts."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sacrebleu.metrics import BLEU

# Per prediction: its reference, or all of them (COCO has five captions per image).
References = Sequence[str | Sequence[str]]


def _check_lengths(predictions: list[str], references: References) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _reference_lists(references: References) -> list[list[str]]:
    return [[ref] if isinstance(ref, str) else list(ref) for ref in references]


def exact_match(predictions: list[str], references: References) -> float:
    """Fraction of predictions equal to their reference (to any one of several), ignoring
    surrounding whitespace."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, _reference_lists(references)))
    return hits / len(predictions)


def bleu4(predictions: list[str], references: References) -> float:
    """Corpus BLEU-4 in [0, 1] from sacrebleu (13a tokenizer, exp smoothing), each prediction
    against its reference or all of its references (n-gram counts clipped by the most any one
    reference has, the brevity penalty from the closest reference length).

    With sacrebleu's effective order, n-gram orders that no reference is long enough to have
    are left out, so a corpus of two- and three-word captions gets a real score instead of 0.
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    lists = _reference_lists(references)
    # sacrebleu takes reference streams; a prediction with fewer references pads with None.
    streams = [[refs[k] if k < len(refs) else None for refs in lists] for k in range(max(map(len, lists)))]
    score = BLEU(effective_order=True).corpus_score(predictions, streams).score / 100.0
    # sacrebleu's float arithmetic can land a hair above 100 for identical corpora.
    return min(score, 1.0)


def load_array(load: Any) -> np.ndarray:
    """An expert-load tensor or array as float numpy of shape (layers, 2, experts)."""
    if hasattr(load, "detach"):  # a torch tensor, possibly on a GPU; avoids importing torch
        load = load.detach().cpu().numpy()
    array = np.asarray(load, dtype=np.float64)
    if array.ndim != 3 or array.shape[1] != 2:
        raise ValueError(f"expert load must have shape (layers, 2, experts), not {array.shape}")
    return array


def expert_balance(load: Any) -> float:
    """Mean over MoE layers of the normalized entropy of the expert-usage distribution.

    ``load`` holds token counts of shape (layers, 2, experts) (image tokens, text tokens);
    both modalities are pooled. 1.0 means every expert got the same share, 0.0 that one
    expert got every token. Layers without tokens are ignored; NaN if no layer has any.
    """
    counts = load_array(load).sum(axis=1)
    counts = counts[counts.sum(axis=1) > 0]
    if len(counts) == 0:
        return math.nan
    experts = counts.shape[1]
    if experts == 1:
        return 1.0
    fractions = counts / counts.sum(axis=1, keepdims=True)
    # 0 * log(0) is 0 in an entropy; np.where keeps log(0) from warning.
    logs = np.log(np.where(fractions > 0, fractions, 1.0))
    entropy = -(fractions * logs).sum(axis=1)
    # Rounded so float noise does not report a perfectly even router as 0.9999999999999997.
    return round(float(np.mean(entropy / math.log(experts))), 12)
