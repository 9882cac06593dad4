"""Small real-image tasks from scikit-learn's bundled handwritten digits (no download).

``load_digits`` holds 1797 real 8x8 scans with 16 grey levels. They make two tasks:
one digit per image captioned with its word, and "scenes" of 2-3 digits whose caption
names them left to right. Scenes for validation are built from scans that no training
scene uses, so a validation score measures reading unseen handwriting.

Training scenes are either written once (``write_digit_scenes``) or drawn afresh for every
epoch and row (``SceneStream``, what ``moevlm demo`` trains on): a fixed set of a few thousand
scenes is soon memorised, fresh ones only leave the digits themselves to learn.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from moevlm.data.augment import Augmentation
from moevlm.data.records import SkippedRows

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VAL_POOL_FRACTION = 0.2  # share of the scans kept for validation scenes


def write_digit_captions(out_dir: str | Path, seed: int = 0) -> Path:
    """Every scan as a 32x32 PNG captioned with its word; returns ``out_dir/digits.csv``."""
    out_dir = Path(out_dir)
    (out_dir / "digits").mkdir(parents=True, exist_ok=True)
    scans, labels = _scans()
    order = np.random.default_rng(seed).permutation(len(scans))
    rows = []
    for i in order:
        name = f"digits/{i:04d}.png"
        Image.fromarray(scans[i]).resize((32, 32), Image.Resampling.BICUBIC).save(out_dir / name)
        rows.append((name, DIGIT_WORDS[labels[i]]))
    return _write_csv(out_dir / "digits.csv", rows)


def write_digit_scenes(out_dir: str | Path, num_train: int, num_val: int, seed: int = 0,
                       min_digits: int = 2, max_digits: int = 3, size: int = 32,
                       snap: int = 1, packed: bool = False) -> tuple[Path | None, Path | None]:
    """Write ``train.csv`` and ``val.csv`` of digit scenes (image path, caption) under out_dir
    (None in place of a split of 0 scenes).

    ``snap`` rounds digit positions to multiples of that many pixels: snapped to a ViT's patch
    grid, every digit fills whole patches, which makes the task much quicker to learn.
    ``packed`` lays the digits side by side from the left edge (vertical offsets stay random),
    so the n-th word always names the n-th column: quicker still.
    """
    out_dir = Path(out_dir)
    paths = []
    for split, count in (("train", num_train), ("val", num_val)):
        if count == 0:  # a split drawn afresh as it trains (SceneStream) is not written
            paths.append(None)
            continue
        scenes = digit_scenes(split, count, seed, min_digits, max_digits, size, snap, packed)
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for n, (image, caption, _) in enumerate(scenes):
            name = f"{split}/{n:06d}.png"
            Image.fromarray(image).save(out_dir / name)
            rows.append((name, caption))
        paths.append(_write_csv(out_dir / f"{split}.csv", rows))
    return paths[0], paths[1]


def digit_scenes(split: str, count: int, seed: int = 0, min_digits: int = 2, max_digits: int = 3, size: int = 32,
                 snap: int = 1, packed: bool = False) -> Iterator[tuple[np.ndarray, str, np.ndarray]]:
    """The scenes ``write_digit_scenes`` writes for ``split`` (train or val), as (uint8 image, caption,
    indices of the scans it shows, left to right): what a baseline that reads the scans needs."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    side = _cell_side(size, min_digits, max_digits)
    scans, labels = _scans()
    cells = _cells(scans, side)
    train_pool, val_pool = digit_pools(len(scans), seed)
    pool = train_pool if split == "train" else val_pool
    # Separate random streams per split: asking for more training scenes leaves the
    # validation scenes unchanged.
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])

    def scenes():  # a generator inside, so that bad arguments fail at the call, not at the first scene
        for _ in range(count):
            picks = _pick(rng, pool, min_digits, max_digits)
            yield _scene(cells[picks], size, rng, snap, packed), _caption(labels, picks), picks

    return scenes()


def _cell_side(size: int, min_digits: int, max_digits: int) -> int:
    """The side of each digit's cell: one cell per digit plus at least one of slack for the gaps."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    side = size // (max_digits + 1)
    if side < 4:
        raise ValueError(f"a {size} px scene is too small for {max_digits} digits")
    return side


def _pick(rng: np.random.Generator, pool: np.ndarray, min_digits: int, max_digits: int) -> np.ndarray:
    """The scans of one scene, in their order left to right."""
    return rng.choice(pool, size=rng.integers(min_digits, max_digits + 1), replace=False)


def _cells(scans: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(s).resize((side, side), Image.Resampling.BICUBIC)) for s in scans])


def _caption(labels: np.ndarray, picks: np.ndarray) -> str:
    """The scans' digits named left to right, as the scene lays them out."""
    return " ".join(DIGIT_WORDS[labels[i]] for i in picks)


def digit_pools(num_scans: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) scan indices: val gets VAL_POOL_FRACTION of them."""
    order = np.random.default_rng([seed, 0]).permutation(num_scans)
    num_val = round(num_scans * VAL_POOL_FRACTION)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def _scans() -> tuple[np.ndarray, np.ndarray]:
    """uint8 scans, dark ink on white as on paper (the data set stores ink as 0..16)."""
    digits = load_digits()
    scans = 255 - np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return scans, digits.target


def _scene(cells: np.ndarray, size: int, rng: np.random.Generator, snap: int = 1,
           packed: bool = False) -> np.ndarray:
    """Lay cells left to right on a white canvas, random gaps and vertical offsets."""
    count, side, _ = cells.shape
    canvas = np.full((size, size), 255, dtype=np.uint8)
    # Split the spare width at random over the gap before, between and after the digits.
    gaps = rng.multinomial(size - count * side, [1 / (count + 1)] * (count + 1))
    if packed:
        gaps[:] = 0
    x = int(gaps[0])
    for cell, gap in zip(cells, gaps[1:]):
        y = int(rng.integers(0, size - side + 1)) // snap * snap
        left = x // snap * snap
        canvas[y:y + side, left:left + side] = cell
        x += side + int(gap)
    return canvas


class SceneStream(Dataset):
    """``length`` training scenes per epoch, each drawn afresh from the training scans by the
    random stream (seed, epoch, row): the same for a given epoch and row whoever reads it, so
    batches, workers and ``--resume`` behave as with scenes on disk, and never the same twice.
    ``augment`` warps each digit in its cell (not the scene, whose layout the captions name).

    Items are those of ``ImageTextDataset``; every scene's caption is one answer with no prompt,
    as a CSV of (image, caption) rows gives."""

    on_bad_row = "error"

    def __init__(self, tokenizer, prepare_image, max_text_len: int, *, seed: int, length: int, size: int = 32,
                 snap: int = 1, packed: bool = False, min_digits: int = 2, max_digits: int = 3,
                 augment: Augmentation | None = None):
        self.tokenizer, self.prepare_image, self.max_text_len = tokenizer, prepare_image, max_text_len
        self.seed, self.length, self.size, self.snap, self.packed = seed, length, size, snap, packed
        self.min_digits, self.max_digits, self.augment = min_digits, max_digits, augment
        scans, self.labels = _scans()
        self.cells = torch.from_numpy(_cells(scans, _cell_side(size, min_digits, max_digits)))
        self.pool, _ = digit_pools(len(scans), seed)
        self.epoch = 0
        self.skipped = SkippedRows()  # the trainer reports skipped rows; a drawn scene is never bad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def has_image(self, index: int) -> bool:
        return True

    def scene(self, epoch: int, index: int) -> tuple[np.ndarray, str]:
        """The uint8 scene and its caption at (epoch, index)."""
        rng, picks = self._draw(epoch, index)
        cells = self.cells[picks]
        if self.augment is not None:
            cells = torch.stack([self.augment(cell[None], self.seed, epoch, index, k)[0]
                                 for k, cell in enumerate(cells)])
        return _scene(cells.numpy(), self.size, rng, self.snap, self.packed), _caption(self.labels, picks)

    def captions(self, epoch: int = 0) -> list[str]:
        """The captions of an epoch (what a tokenizer is trained on), without drawing the images."""
        return [_caption(self.labels, self._draw(epoch, index)[1]) for index in range(self.length)]

    def _draw(self, epoch: int, index: int) -> tuple[np.random.Generator, np.ndarray]:
        """The scene's random stream and the scans it picks (the stream goes on to lay them out)."""
        rng = np.random.default_rng([self.seed, _STREAM, epoch, index])
        return rng, _pick(rng, self.pool, self.min_digits, self.max_digits)

    def __getitem__(self, index: int) -> dict:
        image, caption = self.scene(self.epoch, index)
        ids, labels = self.tokenizer.encode_conversation([("", caption)], self.max_text_len)
        return {"image": self.prepare_image(Image.fromarray(image)), "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels), "index": index, "has_image": True}


_STREAM = 3  # write_digit_scenes draws its training and validation scenes from streams 1 and 2


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path
