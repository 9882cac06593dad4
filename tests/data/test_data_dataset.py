import base64
import logging
import math

import pytest
import torch
from PIL import Image

from moevlm.data import dataset as dataset_module
from moevlm.data import images as images_module
from moevlm.data.augment import Augmentation
from moevlm.data.dataset import (
    EpochBatchSampler,
    ImageTextDataset,
    collate,
    drop_duplicates,
    split_samples,
    tokenizer_texts,
    usable_batch,
)
from moevlm.data.images import ScratchImages, image_key
from moevlm.data.records import Sample
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import DataError

X = -100


@pytest.fixture(scope="module")
def tok():
    tok = Tokenizer.train(["ab", "xy"])
    assert [tok.encode(c)[0] for c in "abxy"] == [5, 6, 7, 8]  # the ids worked out below
    return tok


@pytest.mark.parametrize("turns,ids,labels", [
    # <bos> a b <eos>: every position predicts the next caption token, the last nothing.
    ([("", "ab")], [1, 5, 6, 2], [5, 6, 2, X]),
    # Prompt tokens and <sep> are context: the first target is predicted from <sep>.
    ([("x", "ab"), ("", "y")], [1, 7, 4, 5, 6, 2, 8, 2], [X, X, 5, 6, 2, 8, 2, X]),
    ([("x", "a"), ("y", "b")], [1, 7, 4, 5, 2, 8, 4, 6, 2], [X, X, 5, 2, X, X, 6, 2, X]),
])
def test_encode_turns_labels_are_next_answer_tokens(tok, turns, ids, labels):
    assert tok.encode_conversation(turns, max_text_len=20) == (ids, labels)


def test_encode_turns_refuses_long_text(tok):
    assert len(tok.encode_conversation([("", "abab")], max_text_len=6)[0]) == 6
    with pytest.raises(ValueError, match=r"^text is 7 tokens, longer than decoder.max_text_len 6$"):
        tok.encode_conversation([("", "ababa")], max_text_len=6)


def test_prompt_ids_match_the_training_prefix(tok):
    assert tok.prompt_ids("") == [1]
    assert tok.prompt_ids("x") == [1, 7, 4]
    assert tok.prompt_ids("<image>\nx ") == [1, 7, 4]
    ids, _ = tok.encode_conversation([("x", "ab")], 20)
    assert ids[:3] == tok.prompt_ids("x")


def sample(i, caption="ab", image=None):
    return Sample(image=image or f"/img/{i}.png", turns=[("", caption)], source="d.csv", row=i + 1)


def test_drop_duplicates_keeps_the_first_and_counts_each_drop_naming_the_row_it_repeats():
    rows = [sample(0), sample(1), sample(0), sample(0, caption="xy"), sample(1)]
    rows[2].row = 99
    kept, dropped = drop_duplicates(rows)
    assert [(s.image, s.turns[0][1], s.row) for s in kept] == [
        ("/img/0.png", "ab", 1), ("/img/1.png", "ab", 2), ("/img/0.png", "xy", 1)]
    assert dropped.counts == {"duplicate row": 2}
    assert dropped.reasons() == "2 duplicate row (first: d.csv row 99: duplicate row: same image and text as row 1)"


def test_split_is_deterministic_and_never_leaks_duplicates():
    rows = [sample(i % 37) for i in range(200)]  # 37 unique rows, each repeated
    rows += [Sample(None, [("q", "a")], "d.csv", 300 + k) for k in range(3)]  # a text-only row, 3 times
    train, val = split_samples(rows, val_fraction=0.3, seed=5)
    assert len({s.image for s in val}) == 11 and len({s.image for s in train}) == 27  # floor(38 * 0.3) pictures
    key = lambda s: (s.image, tuple(s.turns))  # noqa: E731
    assert not {key(s) for s in train} & {key(s) for s in val}  # repeats (text-only too) stay together
    assert sorted(train + val, key=lambda s: s.row) == sorted(rows, key=lambda s: s.row)
    again = split_samples(list(rows), val_fraction=0.3, seed=5)
    assert again == (train, val)
    other_seed = split_samples(rows, val_fraction=0.3, seed=6)[1]
    assert [key(s) for s in other_seed] != [key(s) for s in val]
    assert len(split_samples(rows[:10], val_fraction=0.3, seed=0)[1]) == 3  # 10 * 0.3 is 3.0000000000000004


@pytest.mark.parametrize("fraction,seed", [(0.3, 5), (0.1, 0), (0.5, 1)])
def test_split_keeps_every_caption_of_an_image_on_one_side(tmp_path, image_bytes, fraction, seed):
    # 20 pictures with 5 captions each, as COCO has. Even pictures are files, named directly or
    # through a symlink; odd ones are pasted inline, as base64 or as a data: URL of the same bytes.
    rows = []
    for i in range(20):
        data = image_bytes((i * 12, 0, 0))
        (tmp_path / f"{i}.png").write_bytes(data)
        (tmp_path / f"link{i}.png").symlink_to(tmp_path / f"{i}.png")
        spellings = ([str(tmp_path / f"{i}.png"), str(tmp_path / f"link{i}.png")] if i % 2 == 0 else
                     [base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()])
        rows += [Sample(spellings[k % 2], [("", f"picture {i} caption {k}")], "d.csv", 5 * i + k + 1)
                 for k in range(5)]
    train, val = split_samples(rows, val_fraction=fraction, seed=seed)
    pictures = lambda side: {image_key(s.image) for s in side}  # noqa: E731
    assert len(pictures(train) | pictures(val)) == 20
    assert not pictures(train) & pictures(val)
    assert len(pictures(val)) == math.floor(20 * fraction) and len(val) == 5 * len(pictures(val))
    assert sorted(train + val, key=lambda s: s.row) == rows
    assert [s.row for s in train] == sorted(s.row for s in train)  # the data's order kept
    assert split_samples(list(rows), val_fraction=fraction, seed=seed) == (train, val)
    assert pictures(split_samples(rows, val_fraction=fraction, seed=seed + 1)[1]) != pictures(val)


def test_collate_pads_right_and_masks(tok):
    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    batch = [{"image": image, "input_ids": torch.tensor([1, 5, 2]), "labels": torch.tensor([5, 2, X]), "index": 7},
             {"image": torch.zeros_like(image), "input_ids": torch.tensor([1, 7, 4, 5, 2]),
              "labels": torch.tensor([X, X, 5, 2, X]), "index": 3}]
    out = collate(batch, pad_id=tok.pad_id)
    assert out["input_ids"].tolist() == [[1, 5, 2, 0, 0], [1, 7, 4, 5, 2]]
    assert out["labels"].tolist() == [[5, 2, X, X, X], [X, X, 5, 2, X]]
    assert out["attention_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert out["attention_mask"].dtype == torch.bool
    assert out["images"].dtype == torch.float32 and out["images"].shape == (2, 3, 2, 2)
    assert out["images"][0].unique().tolist() == [1.0] and out["images"][1].unique().tolist() == [-1.0]
    assert out["index"].tolist() == [7, 3]


def run_epochs(sampler, epochs):
    return [batch for _ in range(epochs) for batch in sampler]


def test_batch_sampler_epochs_are_seeded_permutations():
    batches = run_epochs(EpochBatchSampler(10, 4, seed=3), 2)
    assert [len(b) for b in batches] == [4, 4, 2] * 2
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert run_epochs(EpochBatchSampler(10, 4, seed=3), 2) == batches
    assert run_epochs(EpochBatchSampler(10, 4, seed=4), 2) != batches


def test_batch_sampler_resumes_exactly_at_any_position():
    reference = EpochBatchSampler(10, 4, seed=1)
    expected, positions = [], []
    for _ in range(3):
        for batch in reference:
            expected.append(batch)
            positions.append((reference.epoch, reference.batch))  # position of the next batch
    assert positions[:4] == [(0, 1), (0, 2), (1, 0), (1, 1)]
    for done in range(len(expected)):
        resumed = EpochBatchSampler(10, 4, seed=1)
        if done:
            resumed.set_position(*positions[done - 1])
        rest = []
        while len(rest) < len(expected) - done:
            rest += list(resumed)
        assert rest == expected[done:], done


def test_batch_sampler_resumes_from_a_consumer_counted_position():
    # A training loop that counts batches itself saves (epoch, len) after an epoch's last
    # batch; resuming there must continue with the next epoch, not repeat or skip one.
    reference = EpochBatchSampler(10, 4, seed=2)
    expected = run_epochs(reference, 3)
    resumed = EpochBatchSampler(10, 4, seed=2)
    resumed.set_position(0, len(resumed))
    assert list(resumed) == [] and (resumed.epoch, resumed.batch) == (1, 0)
    assert run_epochs(resumed, 2) == expected[3:]


def test_batch_sampler_small_data_and_drop_last():
    assert list(EpochBatchSampler(3, 8, seed=0, drop_last=True)) != []
    assert [len(b) for b in EpochBatchSampler(3, 8, seed=0)] == [3]
    assert [len(b) for b in EpochBatchSampler(10, 4, seed=0, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError):
        EpochBatchSampler(10, 4, seed=0).set_position(0, 4)  # 3 batches: 0..3 are positions


def png_ref(image_bytes, color):
    return base64.b64encode(image_bytes(color)).decode()


def test_dataset_decodes_each_image_once(tok, image_bytes, monkeypatch):
    calls = []
    real = dataset_module.open_image
    monkeypatch.setattr(dataset_module, "open_image", lambda ref: calls.append(ref) or real(ref))
    red, blue = png_ref(image_bytes, (255, 0, 0)), png_ref(image_bytes, (0, 0, 255))
    rows = [sample(0, "ab", red), sample(1, "xy", blue), sample(2, "ba", red), sample(3, "yx", red)]
    ds = ImageTextDataset(rows, tok, ScratchImages(4, 3), max_text_len=8)
    assert sorted(calls) == sorted([red, blue])
    assert ds.images.shape == (4, 3, 4, 4) and ds.images.dtype == torch.uint8
    item = ds[1]
    assert item["image"][:, 0, 0].tolist() == [0, 0, 255]
    assert item["input_ids"].tolist() == [1, 7, 8, 2] and item["labels"].tolist() == [7, 8, 2, X]
    assert item["index"] == 1
    for i in range(len(ds)):
        ds[i]
    assert len(calls) == 2  # nothing decoded again when items are read


def test_dataset_bad_rows_name_file_and_row(tok, image_bytes, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(image_bytes(size=(64, 64))[:70])
    good = png_ref(image_bytes, (0, 255, 0))
    bad = [Sample("QUJD" * 20, [("", "ab")], "seed.csv", 2),  # base64 of text, no image
           Sample("data:image/png;base64,%%%", [("", "ab")], "seed.csv", 3),
           Sample(str(tmp_path / "cut.png"), [("", "ab")], "d.jsonl", 4),
           Sample(str(tmp_path / "empty.png"), [("", "ab")], "d.jsonl", 5),
           Sample(good, [("", "ab" * 10)], "d.json", 6)]
    problems = ["cannot decode image", "not valid base64", "cannot decode image", "empty file",
                "text is 22 tokens, longer than decoder.max_text_len 8"]
    for row, problem in zip(bad, problems):
        with pytest.raises(DataError) as info:
            ImageTextDataset([sample(0, "ab", good), row], tok, ScratchImages(4), 8)
        assert str(info.value).startswith(f"{row.source}: row {row.row}: "), str(info.value)
        assert problem in str(info.value)
    ds = ImageTextDataset([sample(0, "ab", good)] + bad + [bad[2]], tok, ScratchImages(4), 8, on_bad_row="skip")
    assert len(ds.skipped) == 6 and len(ds) == 1 and ds.samples[0].row == 1
    assert str(ds.skipped) == (
        "6 bad rows: 5 cannot decode image (first: seed.csv row 2: cannot decode image: not in an image format "
        "Pillow can read), 1 text is N tokens, longer than decoder.max_text_len N (first: d.json row 6: text is "
        "22 tokens, longer than decoder.max_text_len 8)")
    with pytest.raises(DataError, match=r"^d.json, d.jsonl, seed.csv: no usable rows \(skipped 5 bad rows: 4 cannot "
                                        r"decode image \(first: seed.csv row 2: .*\), 1 text is N tokens"):
        ImageTextDataset(bad, tok, ScratchImages(4), 8, on_bad_row="skip")


def test_an_image_file_that_cannot_be_read_stops_even_when_bad_rows_are_skipped(tok, tmp_path, monkeypatch):
    rows = gradient_rows(tmp_path, n=2)
    problem = f"d.csv: row 2: cannot read image file {rows[1].image}: Permission denied"

    def locked(path, *args, **kwargs):  # root reads any file, whatever its mode
        if path == rows[1].image:
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", locked, raising=False)
    for preload in (True, False):
        with pytest.raises(DataError, match=f"^{problem}$"):
            ImageTextDataset(rows, tok, ScratchImages(4), 8, on_bad_row="skip", preload=preload)
    # Readable when checked up front, no longer when its batch is built (in a DataLoader worker).
    monkeypatch.undo()
    ds = ImageTextDataset(rows, tok, ScratchImages(4), 8, on_bad_row="skip", preload=False)
    monkeypatch.setattr(images_module, "open", locked, raising=False)
    batch = collate([ds[0], ds[1]], pad_id=0)
    assert batch["bad_rows"] == [] and batch["unreadable_rows"] == [("d.csv", 2, problem[len("d.csv: row 2: "):])]
    with pytest.raises(DataError, match=f"^{problem}$"):
        usable_batch(batch, "skip")
    with pytest.raises(DataError, match=f"^{problem}$"):
        ds.images_of([0, 1])


def gradient_rows(tmp_path, n=4):
    rows = []
    for i in range(n):
        img = Image.new("RGB", (16, 16))
        img.putdata([(x * 16, y * 16, i * 40) for y in range(16) for x in range(16)])
        img.save(tmp_path / f"{i}.png")
        rows.append(Sample(str(tmp_path / f"{i}.png"), [("", "ab")], "d.csv", i + 1))
    return rows


SHIFTS = Augmentation(translate=0.125)


def test_augmentation_depends_only_on_seed_epoch_index(tok, tmp_path):
    rows = gradient_rows(tmp_path)
    a = ImageTextDataset(rows, tok, ScratchImages(16), 8, augment=SHIFTS, seed=7)
    b = ImageTextDataset(rows, tok, ScratchImages(16), 8, augment=SHIFTS, seed=7)
    b_items = [b[i]["image"] for i in reversed(range(4))][::-1]  # read in another order
    assert all(torch.equal(a[i]["image"], b_items[i]) for i in range(4))
    assert any(not torch.equal(a[i]["image"], a.images[i]) for i in range(4))
    first = [a[i]["image"] for i in range(4)]
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], first[i]) for i in range(4))
    a.set_epoch(0)
    assert all(torch.equal(a[i]["image"], first[i]) for i in range(4))
    c = ImageTextDataset(rows, tok, ScratchImages(16), 8, augment=SHIFTS, seed=8)
    assert any(not torch.equal(c[i]["image"], first[i]) for i in range(4))


@pytest.mark.parametrize("augment", [None, Augmentation()])
def test_no_augmentation_when_off(tok, tmp_path, augment):
    ds = ImageTextDataset(gradient_rows(tmp_path), tok, ScratchImages(16), 8, augment=augment)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert all(torch.equal(ds[i]["image"], ds.images[i]) for i in range(4))


def test_scratch_tokenizer_drops_the_placeholder_as_before(tok):
    # The readers keep "<image>" in prompts now; the scratch numbers must not move.
    for prompt in ("<image>\nx", "x\n<image>", " <image> x "):
        assert tok.encode_conversation([(prompt, "ab")], 20) == ([1, 7, 4, 5, 6, 2], [X, X, 5, 6, 2, X])
    assert tok.encode_conversation([("<image>", "ab")], 20) == tok.encode_conversation([("", "ab")], 20)
    assert tok.prompt_ids("<image>") == [1]


def test_tokenizer_texts_leave_the_placeholder_out():
    rows = [Sample("a.png", [("<image>\nxy", "ab"), ("yx", "ba")], "d.json", 1), sample(1, "ab")]
    assert tokenizer_texts(rows) == ["xy", "ab", "yx", "ba", "ab"]


def test_a_dataset_that_does_not_preload_gives_the_items_of_one_that_does(tok, tmp_path):
    rows = gradient_rows(tmp_path)
    eager = ImageTextDataset(rows, tok, ScratchImages(8), 8, augment=SHIFTS, seed=3)
    lazy = ImageTextDataset(rows, tok, ScratchImages(8), 8, augment=SHIFTS, seed=3, preload=False)
    assert lazy.images is None
    for i in range(len(rows)):
        assert all(torch.equal(eager[i][key], lazy[i][key]) for key in ("image", "input_ids", "labels"))
    assert torch.equal(eager.images_of([2, 0])[0], lazy.images_of([2, 0])[0])


def test_without_preload_headers_are_checked_up_front_and_undecodable_images_set_aside(tok, image_bytes, tmp_path,
                                                                                        caplog):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(image_bytes(size=(64, 64))[:70])  # a whole header, the pixels cut off
    good = png_ref(image_bytes, (0, 255, 0))
    empty = Sample(str(tmp_path / "empty.png"), [("", "ab")], "d.jsonl", 5)
    with pytest.raises(DataError, match="d.jsonl: row 5: cannot decode image: empty file"):
        ImageTextDataset([sample(0, "ab", good), empty], tok, ScratchImages(4), 8, preload=False)
    cut = Sample(str(tmp_path / "cut.png"), [("", "ab")], "d.jsonl", 4)
    ds = ImageTextDataset([sample(0, "ab", good), cut], tok, ScratchImages(4), 8, preload=False)
    assert len(ds) == 2 and ds[1]["bad"][:2] == ("d.jsonl", 4)
    batch = collate([ds[0], ds[1]], pad_id=0)
    assert batch["images"].shape[0] == 1 and batch["bad_rows"][0][:2] == ("d.jsonl", 4)
    with pytest.raises(DataError, match="d.jsonl: row 4: cannot decode image"):
        usable_batch(dict(batch), "error")
    with caplog.at_level(logging.WARNING, logger="moevlm"):
        assert usable_batch(dict(batch), "skip")["images"].shape[0] == 1
        assert usable_batch(collate([ds[1], ds[0], ds[1]], pad_id=0), "skip")["images"].shape[0] == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 bad row: 1 cannot decode image (first: d.jsonl row 4: {ds[1]['bad'][2]})",
        f"skipped 2 bad rows: 2 cannot decode image (first: d.jsonl row 4: {ds[1]['bad'][2]})"]
    assert usable_batch(collate([ds[1]], pad_id=0), "skip") is None
    with pytest.raises(DataError, match="d.jsonl: row 4: cannot decode image"):
        ds.images_of([0, 1])
    skipping = ImageTextDataset([sample(0, "ab", good), cut], tok, ScratchImages(4), 8, preload=False,
                                on_bad_row="skip")
    assert skipping.images_of([0, 1])[1] == [0]
