import math

import numpy as np
import pytest
import torch

from moevlm.metrics import bleu4, caption_words, cider_d, exact_match, expert_balance

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


def test_cider_d_on_a_case_worked_out_by_hand():
    """Two images, references ["a cat", "the cat"] and ["a dog"], predictions "cat cat cat" and "a dog".

    Document frequencies (images whose references hold the n-gram): "a" 2, every other n-gram 1 or
    0, so with L = log 2 images the IDF log(2) - log(max(1, df)) is 0 for "a" and L for the rest.

    Image 2: "a dog" equals its reference: order 1 is {a: 0, dog: L} against itself, cosine 1;
    order 2 {"a dog": L}, cosine 1; orders 3 and 4 are empty, 0. Score 10 * (1 + 1) / 4 = 5.

    Image 1: the prediction's order 1 is {cat: 3L} (norm 3L), order 2 {"cat cat": 2L}, order 3
    {"cat cat cat": L}. Against "a cat" ({a: 0, cat: L}, norm L) the clipped dot product is
    min(3L, L) * L = L^2, cosine L^2 / (3L * L) = 1/3; orders 2-4 share nothing, 0. Against "the
    cat" ({the: L, cat: L}, norm sqrt(2) L) it is L^2 / (3L * sqrt(2) L) = 1 / (3 sqrt(2)). Both
    references are 2 words against 3: length penalty exp(-1 / (2 * 6^2)) = exp(-1/72). Score
    10 * exp(-1/72) * (1/3 + 1/(3 sqrt(2))) / 4 orders / 2 references = 0.70148...

    CIDEr-D is the mean, (0.70148 + 5) / 2 = 2.85074...; pycocoevalcap 1.2's Cider gives
    2.850741845134994 on the same captions.
    """
    image_1 = 10 * math.exp(-1 / 72) * (1 / 3 + 1 / (3 * math.sqrt(2))) / 4 / 2
    expected = (image_1 + 5.0) / 2
    predictions, references = ["cat cat cat", "a dog"], [["a cat", "the cat"], ["a dog"]]
    assert cider_d(predictions, references) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(2.850741845134994, abs=1e-12)
    # Without the clipping "cat" x3 would match fully (cosine 1 against "a cat"), without the
    # length penalty exp(-1/72) would be 1: both change the value.
    assert cider_d(["cat", "a dog"], references) > cider_d(predictions, references)


def test_cider_d_equals_pycocoevalcap_on_a_random_corpus():
    """Values from pycocoevalcap 1.2 (``Cider().compute_score``, captions given already tokenized);
    200 random corpora of 2-6 images agreed to 2e-16 when this was written."""
    references = [["mat two small", "green the", "small sits sits square dog small blue the"],
                  ["a two dog dog mat small small a", "green big small blue mat the cat a", "a"],
                  ["a dog square blue dog big a on blue", "sits on blue cat blue square blue small",
                   "green a dog two on square the red"],
                  ["the big cat big big", "dog on two square blue green green mat sits",
                   "dog mat two a sits blue big small dog"]]
    predictions = ["square red cat on big small square", "the sits square on the small", "on two dog",
                   "sits big a sits a green"]
    assert cider_d(predictions, references) == pytest.approx(0.4991942260655722, abs=1e-12)


def test_cider_d_reads_words_as_coco_caption_does():
    assert caption_words("A man's red Car, parked.") == ["a", "man", "'s", "red", "car", "parked"]
    assert cider_d(["A dog!", "the Cat"], [["a dog"], ["the cat ."]]) == cider_d(["a dog", "the cat"],
                                                                               [["a dog"], ["the cat"]])
    assert cider_d([], []) == 0.0
    assert cider_d(["a dog"], [["a dog"]]) == 0.0  # one image: every IDF is log(1) - log(1) = 0
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])
