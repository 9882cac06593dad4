import math

import numpy as np
import pytest
import torch

from moevlm.metrics import bleu4, exact_match, expert_balance

CAPTIONS = ["a small red car parked next to a tree",
            "two dogs are playing with a ball in the park",
            "a man riding a bicycle down a busy street"]


def test_exact_match_ignores_surrounding_whitespace_only():
    predictions = [" cat", "dog\n", "two birds", "Red"]
    references = ["cat", "dog", "two  birds", "red"]
    assert exact_match(predictions, references) == 0.5


def test_exact_match_empty_and_mismatched():
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_bleu4_identical_is_one():
    assert bleu4(CAPTIONS, CAPTIONS) == 1.0


def test_bleu4_unrelated_is_near_zero():
    unrelated = ["quantum entropy of stellar furnaces", "seventeen violins argued loudly",
                 "the spreadsheet compiled slowly overnight"]
    assert bleu4(unrelated, CAPTIONS) < 0.05


def test_bleu4_partial_overlap_is_between():
    predictions = ["a small red car parked near a house", "two dogs are playing in the park",
                   "a woman riding a horse down a quiet street"]
    assert 0.1 < bleu4(predictions, CAPTIONS) < 0.9


def test_bleu4_mismatched_lengths():
    with pytest.raises(ValueError):
        bleu4(CAPTIONS, CAPTIONS[:2])


@pytest.mark.parametrize("experts", [2, 3, 5, 7, 8, 100])
def test_expert_balance_uniform_is_one(experts):
    assert expert_balance(np.full((3, 2, experts), 5)) == 1.0


def test_expert_balance_all_on_one_expert_is_zero():
    load = np.zeros((2, 2, 4))
    load[:, :, 1] = 10
    assert expert_balance(load) == 0.0


def test_expert_balance_pools_modalities_and_ignores_empty_layers():
    load = torch.zeros(3, 2, 2)
    # Image tokens all to expert 0, text tokens all to expert 1: even once pooled.
    load[0, 0, 0] = 6
    load[0, 1, 1] = 6
    load[1, :, 0] = 4  # all on one expert
    # layer 2 saw no tokens and must not pull the mean towards 0
    assert expert_balance(load) == pytest.approx(0.5)


def test_expert_balance_partial_value():
    # Fractions 3/4, 1/4 over 2 experts: entropy / log 2.
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert expert_balance(np.array([[[3, 1], [0, 0]]])) == pytest.approx(expected)


def test_expert_balance_without_tokens_is_nan_and_bad_shape_raises():
    assert math.isnan(expert_balance(np.zeros((2, 2, 4))))
    with pytest.raises(ValueError):
        expert_balance(np.ones((2, 4)))


def test_bleu4_scores_captions_shorter_than_four_words():
    references = ["zero two seven", "one zero", "nine seven four"]
    assert bleu4(references, references) == 1.0
    assert 0.3 < bleu4(["zero two seven", "one zero", "nine seven five"], references) < 0.9
