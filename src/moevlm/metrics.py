"""Evaluation metrics: answer accuracy, caption BLEU and CIDEr-D, and how evenly MoE layers use their
experts."""

from __future__ import annotations

import math
import re
from collections import Counter
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


# Words of a caption for CIDEr-D: lowercased, punctuation dropped (coco-caption's PTB tokenizer does the
# same in Java; "man's" gives "man", "'s" there and here).
_WORD = re.compile(r"'?[^\s.?!,:;\-`'\"(){}\[\]]+")
CIDER_SIGMA = 6.0  # the standard deviation of CIDEr-D's length penalty, in words


def caption_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: list[str], references: References, n: int = 4) -> float:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption's ``Cider`` computes it; COCO results quote it
    x10, as here), each prediction against all of its references, averaged over predictions.

    Per n-gram order 1..n, a sentence is a vector of tf-idf weights: count x (log(images) -
    log(max(1, df))), df being the number of images whose references contain the n-gram (the
    references of this corpus are the documents). A prediction's similarity to a reference is the
    cosine of the two vectors with the prediction's weights clipped at the reference's (saying "cat"
    three times earns no more than the reference's one), times the length penalty
    exp(-(words - reference words)^2 / (2 x 6^2)). The score is 10 x the mean over orders and
    references. With one image every weight is 0, and so is the score: CIDEr needs a corpus.
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    refs = [[_sentence(ref, n) for ref in group] for group in _reference_lists(references)]
    doc_freq = Counter(gram for group in refs for gram in {g for counts, _ in group for g in counts})
    log_images = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        vectors: list[dict] = [{} for _ in range(n)]
        for gram, count in counts.items():
            vectors[len(gram) - 1][gram] = count * (log_images - math.log(max(1, doc_freq[gram])))
        return vectors, [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]

    scores = []
    for prediction, group in zip(predictions, refs):
        counts, length = _sentence(prediction, n)
        hyp, hyp_norms = tfidf(counts)
        total = 0.0
        for ref_counts, ref_length in group:
            ref, ref_norms = tfidf(ref_counts)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * CIDER_SIGMA ** 2))
            for order in range(n):
                dot = sum(min(w, ref[order].get(g, 0.0)) * ref[order].get(g, 0.0) for g, w in hyp[order].items())
                if hyp_norms[order] and ref_norms[order]:
                    total += penalty * dot / (hyp_norms[order] * ref_norms[order])
        scores.append(10.0 * total / n / len(group))
    return float(np.mean(scores))


def _sentence(text: str, n: int) -> tuple[Counter, int]:
    words = caption_words(text)
    return _ngrams(words, n), len(words)


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
