"""data.group_by_length: batches of one modality and similar length, still shuffled, exactly
resumable, the same on any number of ranks, and much less padding on a LLaVA-like length mix."""

import json
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from formats import write_mixed_llava

from moevlm.cli import main
from moevlm.config import load_config
from moevlm.data.dataset import EpochBatchSampler
from moevlm.data.length_groups import LengthGroupedBatchSampler, length_grouped_batches, padded_share
from moevlm.errors import ConfigError
from moevlm.train import trainer as trainer_module
from moevlm.train.distributed import RankBatches, World
from moevlm.train.run import run_training


def llava_like(rows=3000, image_tokens=576, seed=0):
    """30 % captions (20-40 tokens), 60 % conversations (100-1,500), 10 % text-only conversations."""
    rng = random.Random(seed)
    lengths, has_image = [], []
    for _ in range(rows):
        kind = rng.random()
        image = kind < 0.9
        text = rng.randint(20, 40) if kind < 0.3 else rng.randint(100, 1500)
        lengths.append(text + image_tokens * image)
        has_image.append(image)
    return lengths, has_image


def epochs(sampler, n):
    return [list(sampler) for _ in range(n)]


@pytest.mark.parametrize("image_tokens", [576, 0])
def test_grouping_cuts_the_padded_share_of_a_llava_like_mix_by_more_than_half(image_tokens):
    lengths, has_image = llava_like(image_tokens=image_tokens)
    random_share = padded_share(list(EpochBatchSampler(len(lengths), 32, seed=0)), lengths)
    grouped_share = padded_share(list(LengthGroupedBatchSampler(lengths, has_image, 32, seed=0)), lengths)
    assert random_share > 0.4
    assert grouped_share < random_share / 2


def test_padded_share_counts_each_ranks_part_padded_to_its_own_longest():
    lengths = [10, 10, 4, 2]
    assert padded_share([[0, 1, 2, 3]], lengths) == pytest.approx((6 + 8) / 40)
    assert padded_share([[0, 1, 2, 3]], lengths, ranks=2) == pytest.approx(2 / 28)


def test_every_row_once_per_epoch_batches_of_one_modality_and_as_many_batches_as_random():
    lengths, has_image = llava_like(rows=1003)
    sampler = LengthGroupedBatchSampler(lengths, has_image, 32, seed=1)
    assert len(sampler) == len(EpochBatchSampler(1003, 32, seed=1)) == 32
    for batches in epochs(sampler, 2):
        assert sorted(i for rows in batches for i in rows) == list(range(1003))
        assert [len(rows) for rows in batches] == [32] * 31 + [11]
        # The rows left over from each modality's stream come last (here the two last batches);
        # every other batch is of one modality.
        assert all(len({has_image[i] for i in rows}) == 1 for rows in batches[:-2])
    dropping = LengthGroupedBatchSampler(lengths, has_image, 32, seed=1, drop_last=True)
    assert [len(rows) for rows in dropping.epoch_batches(0)] == [len(rows) for rows in dropping] == [32] * 31


def test_a_mega_batch_is_sorted_by_length_and_its_batches_do_not_overlap_in_length():
    lengths, has_image = list(range(64)), [True] * 64
    batches = length_grouped_batches(lengths, has_image, 4, torch.Generator().manual_seed(0), megabatch=16)
    assert all(rows == sorted(rows, reverse=True) for rows in batches)
    spans = sorted((min(rows), max(rows)) for rows in batches)
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))


def test_order_is_shuffled_per_epoch_and_the_same_for_the_same_seed():
    lengths, has_image = llava_like(rows=500)
    first, second = epochs(LengthGroupedBatchSampler(lengths, has_image, 16, seed=5), 2)
    assert first != second
    assert epochs(LengthGroupedBatchSampler(lengths, has_image, 16, seed=5), 2) == [first, second]
    assert list(LengthGroupedBatchSampler(lengths, has_image, 16, seed=6)) != first


@pytest.mark.parametrize("stop", [0, 7, 31, 32])
def test_interrupted_and_resumed_gives_the_batches_of_an_uninterrupted_run(stop):
    lengths, has_image = llava_like(rows=1003)
    straight = [b for epoch in epochs(LengthGroupedBatchSampler(lengths, has_image, 32, seed=2), 3) for b in epoch]
    first = LengthGroupedBatchSampler(lengths, has_image, 32, seed=2)
    taken = [b for epoch in epochs(first, 1) for b in epoch] + [b for _, b in zip(range(stop), first)]
    resumed = LengthGroupedBatchSampler(lengths, has_image, 32, seed=2)
    resumed.set_position(1 if stop < 32 else 2, stop % 32)
    while len(taken) < len(straight):
        taken += list(resumed)
    assert taken == straight


def test_two_ranks_take_the_halves_of_the_batches_one_rank_trains_on():
    lengths, has_image = llava_like(rows=203)
    whole = epochs(LengthGroupedBatchSampler(lengths, has_image, 8, seed=3, min_rows=2), 2)
    parts = [epochs(RankBatches(LengthGroupedBatchSampler(lengths, has_image, 8, seed=3, min_rows=2), rank, 2), 2)
             for rank in (0, 1)]
    assert [[a + b for a, b in zip(*epoch)] for epoch in zip(*parts)] == whole
    assert all(len(rows) >= 1 for part in parts for epoch in part for rows in epoch)


def test_lengths_and_modalities_must_match():
    with pytest.raises(ValueError, match="3 lengths but 2 has_image flags"):
        LengthGroupedBatchSampler([1, 2, 3], [True, False], 2, seed=0)


def test_a_training_run_groups_by_length_and_resumes_exactly(tmp_path, monkeypatch):
    data = write_mixed_llava(tmp_path, rows=24)
    config = load_config("tiny", overrides=["data.group_by_length=true", "train.batch_size=4", "train.max_steps=6",
                                            "train.checkpoint_every=3", "train.eval_every=3", "train.log_every=1",
                                            "train.val_generate=0", "data.val_fraction=0",
                                            "decoder.max_text_len=32"])
    seen = []
    batches = trainer_module.Trainer.batches

    def recording(self):
        for batch in batches(self):
            seen.append(batch["has_image"].tolist())
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "batches", recording)
        straight, _ = run_training(config, data, tmp_path / "straight", tracking=False, progress=False)
    assert isinstance(straight.sampler, LengthGroupedBatchSampler)
    n = straight.model.num_image_tokens
    assert straight.sampler.lengths == [len(straight.train_set[i]["input_ids"]) + n * straight.train_set.has_image(i)
                                        for i in range(len(straight.train_set))]
    assert all(len(set(rows)) == 1 for rows in seen)  # 12 image rows, 12 text-only: no mixed batch
    saved = trainer_module.Trainer.save

    def save_and_copy(self):
        saved(self)
        if self.step == 3:
            shutil.copytree(self.out_dir, tmp_path / "interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "save", save_and_copy)
        run_training(config, data, tmp_path / "other", tracking=False, progress=False)
    resumed, _ = run_training(config, data, tmp_path / "interrupted", tracking=False, progress=False, resume=True)
    timing = "train/tokens_per_s"
    assert {k: v for k, v in resumed.history.items() if k != timing} == \
        {k: v for k, v in straight.history.items() if k != timing}


def test_two_ranks_train_on_the_batches_one_process_trains_on(tmp_path):
    """A real two-rank (gloo, DDP) run groups by length as one process does: the same losses."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from ranks import train_ranks

    data = write_mixed_llava(tmp_path, rows=24)
    args = ["--data", str(data), "--preset", "tiny", "--no-tracking", "--set", "data.group_by_length=true",
            "--set", "moe.router_noise=false", "--set", "train.batch_size=4", "--set", "train.max_steps=6",
            "--set", "train.log_every=1", "--set", "train.eval_every=6", "--set", "train.val_generate=0",
            "--set", "data.val_fraction=0", "--set", "decoder.max_text_len=32", "--set", "dist.strategy=ddp"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    train_ranks([*args, "--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / run / "trainer_state.json").read_text())["history"] for run in ("one", "two"))
    for key in ("train/loss", "train/lm_loss", "train/grad_norm"):
        assert [v for _, v in two[key]] == pytest.approx([v for _, v in one[key]], rel=1e-5, abs=1e-6), key


def test_rows_without_known_lengths_are_refused_in_one_line():
    config = load_config("tiny", overrides=["data.group_by_length=true"])
    trainer = SimpleNamespace(config=config, world=World())
    with pytest.raises(ConfigError, match=r"^data.group_by_length needs rows whose lengths are known up front; "
                                          r"generated rows \(the demo's scenes, drawn afresh each epoch\) have none: "
                                          r"set it to false$"):
        trainer_module.Trainer._batch_sampler(trainer, None, SimpleNamespace())
