import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from moevlm.data import digits
from moevlm.data.digits import DIGIT_WORDS, digit_pools, digit_scenes, write_digit_captions, write_digit_scenes
from moevlm.data.records import read_samples


def test_digit_captions_cover_every_scan(tmp_path):
    path = write_digit_captions(tmp_path)
    samples, _ = read_samples(path)
    assert len(samples) == 1797
    words = sorted(s.turns[0][1] for s in samples)
    expected = sorted(DIGIT_WORDS[t] for t in load_digits().target)
    assert words == expected
    img = Image.open(samples[0].image)
    assert img.size == (32, 32)


def test_pools_are_disjoint_and_cover_all_scans():
    train, val = digit_pools(1797, seed=0)
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(1797))
    assert len(val) == 359
    assert np.array_equal(digit_pools(1797, seed=0)[1], val)
    assert not np.array_equal(digit_pools(1797, seed=1)[1], val)


def numbered_scans(count=1797):
    """Fake 8x8 scans that carry their own index in two pixels, on a dark background."""
    scans = np.zeros((count, 8, 8), dtype=np.uint8)
    scans[:, 0, 0] = np.arange(count) % 200 + 10
    scans[:, 0, 1] = np.arange(count) // 200 + 10
    return scans, np.arange(count) % 10


def scans_in_scene(path):
    """Indices of the fake scans pasted into a scene, left to right."""
    scene = np.asarray(Image.open(path))
    inked_cols = np.flatnonzero((scene != 255).any(axis=0))
    found = []
    for x in inked_cols[::8]:  # cells are 8 wide, side by side or apart
        y = np.flatnonzero(scene[:, x] != 255)[0]
        found.append(int(scene[y, x]) - 10 + 200 * (int(scene[y, x + 1]) - 10))
    return found


def test_scenes_use_only_their_own_pool_and_name_digits_left_to_right(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "_scans", numbered_scans)
    train_csv, val_csv = write_digit_scenes(tmp_path, num_train=200, num_val=100, seed=3)
    train_pool, val_pool = (set(p.tolist()) for p in digit_pools(1797, seed=3))
    for csv_path, pool in ((train_csv, train_pool), (val_csv, val_pool)):
        samples, _ = read_samples(csv_path)
        assert len(samples) == (200 if pool is train_pool else 100)
        for s in samples:
            used = scans_in_scene(s.image)
            assert 2 <= len(used) <= 3
            assert set(used) <= pool
            assert s.turns[0][1] == " ".join(DIGIT_WORDS[i % 10] for i in used)


def test_digit_scenes_are_the_written_scenes_with_their_scans(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "_scans", numbered_scans)
    _, val_csv = write_digit_scenes(tmp_path, num_train=0, num_val=30, seed=3, snap=8, packed=True)
    samples, _ = read_samples(val_csv)
    drawn = list(digit_scenes("val", 30, seed=3, snap=8, packed=True))
    assert len(drawn) == len(samples) == 30
    for sample, (image, caption, picks) in zip(samples, drawn):
        assert np.array_equal(np.asarray(Image.open(sample.image)), image)
        assert caption == sample.turns[0][1]
        assert picks.tolist() == scans_in_scene(sample.image)


def test_digit_scenes_refuse_an_unknown_split():
    with pytest.raises(ValueError, match="split must be train or val, not 'test'"):
        digit_scenes("test", 1)


def test_scenes_are_real_digits_and_deterministic(tmp_path):
    first = write_digit_scenes(tmp_path / "a", num_train=30, num_val=10, seed=1)
    again = write_digit_scenes(tmp_path / "b", num_train=30, num_val=10, seed=1)
    more = write_digit_scenes(tmp_path / "c", num_train=50, num_val=10, seed=1)
    for a, b in zip(first, again):
        assert a.read_text() == b.read_text()
    scene = Path("train") / "000007.png"
    assert (tmp_path / "a" / scene).read_bytes() == (tmp_path / "b" / scene).read_bytes()
    assert first[1].read_text() == more[1].read_text()  # more training scenes, same validation
    samples, _ = read_samples(first[0])
    for s in samples:
        words = s.turns[0][1].split()
        assert 2 <= len(words) <= 3 and set(words) <= set(DIGIT_WORDS)
        img = Image.open(s.image)
        assert img.size == (32, 32)
        assert np.asarray(img).min() < 128  # some ink on the white page
    captions = {s.turns[0][1] for s in samples}
    assert len(captions) > 20


def test_scenes_refuse_sizes_too_small():
    with pytest.raises(ValueError):
        write_digit_scenes("unused", 1, 1, size=12, max_digits=3)
    with pytest.raises(ValueError, match="a 12 px scene is too small for 3 digits"):
        digits.SceneStream(None, None, 8, seed=0, length=1, size=12)


def test_snapped_scenes_put_every_digit_on_the_grid(tmp_path):
    train_csv, _ = write_digit_scenes(tmp_path, num_train=40, num_val=2, snap=8)
    for row in list(csv.DictReader(open(train_csv)))[:40]:
        ink = np.asarray(Image.open(tmp_path / row["image"]).convert("L")) < 255
        cells = ink.reshape(4, 8, 4, 8).any(axis=(1, 3))  # which 8x8 grid cells hold ink
        columns = cells.any(axis=0)
        assert columns.sum() == len(row["caption"].split())  # one digit per column, none split
        assert (cells.sum(axis=0) <= 1).all()


def test_packed_scenes_fill_columns_from_the_left(tmp_path):
    train_csv, _ = write_digit_scenes(tmp_path, num_train=20, num_val=2, snap=8, packed=True)
    for row in csv.DictReader(open(train_csv)):
        ink = np.asarray(Image.open(tmp_path / row["image"]).convert("L")) < 255
        columns = ink.reshape(4, 8, 4, 8).any(axis=(0, 1, 3))
        count = len(row["caption"].split())
        assert columns.tolist() == [True] * count + [False] * (4 - count)


class WordTokenizer:
    """Enough of a tokenizer for SceneStream: one id per digit word."""

    def encode_conversation(self, turns, max_text_len, image=True):
        ids = [DIGIT_WORDS.index(word) for word in turns[0][1].split()]
        return ids, ids


def scene_stream(seed=0, augment=None):
    from moevlm.data.digits import SceneStream
    from moevlm.data.images import ScratchImages

    return SceneStream(WordTokenizer(), ScratchImages(32, channels=1), 8, seed=seed, length=50, size=32, snap=8,
                       packed=True, augment=augment)


def test_scene_stream_draws_the_same_scene_for_the_same_seed_epoch_and_row_and_fresh_ones_otherwise():
    a, b = scene_stream(), scene_stream()
    b_items = [b[i] for i in reversed(range(50))][::-1]  # read in another order
    assert all(torch.equal(a[i]["image"], b_items[i]["image"]) and a[i]["input_ids"].tolist() ==
               b_items[i]["input_ids"].tolist() for i in range(50))
    first = [a[i]["image"] for i in range(50)]
    a.set_epoch(1)
    assert sum(torch.equal(a[i]["image"], first[i]) for i in range(50)) == 0
    assert sum(torch.equal(scene_stream(seed=1)[i]["image"], first[i]) for i in range(50)) == 0
    a.set_epoch(0)
    assert all(torch.equal(a[i]["image"], first[i]) for i in range(50))


def test_scene_stream_uses_training_scans_only_and_its_captions_name_them():
    stream = scene_stream()
    scans, labels = digits._scans()
    train_pool, val_pool = digit_pools(len(scans), seed=0)
    train_cells = {scans[i].tobytes() for i in train_pool}
    assert stream.captions(2) == [stream.scene(2, i)[1] for i in range(50)]
    for index in range(50):
        image, caption = stream.scene(0, index)
        words = caption.split()
        assert 2 <= len(words) <= 3
        cells = [image[y:y + 8, 8 * k:8 * k + 8] for k in range(len(words)) for y in range(0, 25)
                 if image[y:y + 8, 8 * k:8 * k + 8].tobytes() in train_cells]
        assert len(cells) == len(words)  # packed from the left, each an unchanged training scan
        assert [DIGIT_WORDS[labels[next(i for i in train_pool if scans[i].tobytes() == c.tobytes())]]
                for c in cells] == words


def test_scene_stream_augments_each_digit_within_its_cell():
    from moevlm.data.augment import Augmentation

    plain, warped = scene_stream(), scene_stream(augment=Augmentation(translate=0.125, rotate=10))
    for index in range(10):
        a, caption = plain.scene(0, index)
        b, same = warped.scene(0, index)
        assert caption == same and not np.array_equal(a, b)
        count = len(caption.split())
        assert (b[:, 8 * count:] == 255).all()  # the paper right of the digits stays blank
