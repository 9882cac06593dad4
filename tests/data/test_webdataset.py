"""WebDataset tar shards as --data: indexing, training through the CLI, worker splitting, resume, hostile shards."""

import io
import json
import os
import pickle
import re
import tarfile

import pytest
import torch
from PIL import Image

from moevlm.cli import main
from moevlm.config import DataConfig, load_config
from moevlm.data.dataset import ImageTextDataset
from moevlm.data.images import ScratchImages, image_key, open_image
from moevlm.data.sources import read_data
from moevlm.data.tokenizer import Tokenizer
from moevlm.data.training_data import load_training_data
from moevlm.data.webdataset import MiB, ShardImage, read_shards
from moevlm.errors import DataError
from moevlm.train import trainer as trainer_module
from moevlm.train.run import run_training

COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
NAMES = ["red", "green", "blue", "yellow"]


def png(color, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members):
    """``members``: (name, bytes) pairs, or TarInfo objects for members without data (links, devices);
    gzip-compressed when ``path`` ends in .tgz or .gz."""
    mode = "w:gz" if str(path).lower().endswith((".tgz", ".gz")) else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder, shards=3, keys=4):
    """``shards`` shards of ``keys`` keys each: a solid colour image and its caption. Shard 0 writes
    its texts as .txt, shard 1 as JSON captions, shard 2 as JSON conversations; every key also has
    a .cls member (ignored). Returns {key: colour index}."""
    folder.mkdir(exist_ok=True)
    colors = {}
    for s in range(shards):
        members = []
        for k in range(keys):
            key, c = f"{s:05d}{k:04d}", (s + k) % len(COLORS)
            colors[key] = c
            caption = f"a {NAMES[c]} square"
            text = (("txt", caption.encode()) if s == 0 else
                    ("json", json.dumps({"caption": caption, "url": "x"}).encode()) if s == 1 else
                    ("json", json.dumps({"conversations": [{"from": "human", "value": "<image> hue?"},
                                                           {"from": "gpt", "value": caption}]}).encode()))
            members += [(f"{key}.{'png' if k % 2 else 'jpg'}", png(COLORS[c], "PNG" if k % 2 else "JPEG")),
                        (f"{key}.{text[0]}", text[1]), (f"{key}.cls", b"3")]
        write_tar(folder / f"{s:05d}.tar", members)
    return colors


@pytest.fixture
def shards(tmp_path):
    colors = write_shards(tmp_path / "shards")
    return tmp_path / "shards", colors


def test_shards_are_indexed_by_brace_pattern_or_glob_with_images_left_in_place(shards):
    folder, colors = shards
    samples, skipped = read_shards(f"{folder}/{{00000..00002}}.tar")
    assert len(skipped) == 0
    rows = [(f"{folder}/{i:05d}.tar", k) for i in range(3) for k in (1, 2, 3, 4)]
    assert [(s.source, s.row) for s in samples] == rows
    globbed, _ = read_shards(f"{folder}/*.tar")
    assert [s.image for s in globbed] == [s.image for s in samples]
    assert samples[0].turns == [("", "a red square")]  # .txt
    assert samples[5].turns == [("", "a blue square")]  # JSON caption
    assert samples[9].turns == [("<image> hue?", "a yellow square")]  # JSON conversation
    first = samples[1].image
    assert isinstance(first, ShardImage)
    assert first.read_bytes() == png(COLORS[1])  # the member's exact bytes, from its offset
    assert image_key(first) == f"{folder / '00000.tar'}#000000001"
    assert pickle.loads(pickle.dumps(first)) == first  # travels to DataLoader workers
    assert open_image(samples[3].image).getpixel((8, 8)) == COLORS[3]  # a PNG: exact
    assert read_shards(f"{folder}/{{00000..00002}}.tar", max_rows=6)[0] == samples[:6]


@pytest.mark.parametrize("pattern,message", [
    ("{00000..00003}.tar", r"00003.tar: no such shard$"),
    ("x*.tar", r"x\*.tar: no shard matches this pattern$"),
    ("{00000..00002.tar", r"unbalanced braces in the shard pattern$"),
])
def test_a_pattern_naming_missing_shards_is_refused(shards, pattern, message):
    folder, _ = shards
    with pytest.raises(DataError, match=message):
        read_shards(f"{folder}/{pattern}")


def train(config, data, out, **kw):
    return run_training(config, data, out, tracking=False, progress=False, **kw)


def record_batches(monkeypatch):
    """The rows (and images) of every batch the trainer trains on, in order."""
    seen = []
    usable = trainer_module.usable_batch

    def recording(batch, on_bad_row):
        batch = usable(batch, on_bad_row)
        seen.append((batch["index"].tolist(), batch["images"]))
        return batch

    monkeypatch.setattr(trainer_module, "usable_batch", recording)
    return seen


def test_train_tiny_preset_on_shards_through_the_cli(shards, tmp_path, capsys):
    folder, _ = shards
    code = main(["train", "--data", f"{folder}/{{00000..00002}}.tar", "--preset", "tiny",
                 "--out", str(tmp_path / "run"), "--set", "train.max_steps=3", "--set", "data.preload=false",
                 "--set", "data.val_fraction=0.25"])
    assert code == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["step"] == 3


def test_val_data_may_be_shards_too(shards):
    folder, _ = shards
    config = load_config("tiny", overrides=["data.val_fraction=0"])
    data = load_training_data(config, f"{folder}/{{00000,00001}}.tar", val_data=folder / "00002.tar")
    assert len(data.train_set) == 8 and len(data.val_set) == 4
    assert {s.source for s in data.val_set.samples} == {str(folder / "00002.tar")}


def test_two_workers_see_every_sample_exactly_once_per_epoch(shards, tmp_path, monkeypatch):
    folder, colors = shards
    seen = record_batches(monkeypatch)
    config = load_config("tiny", overrides=["train.max_steps=6", "train.batch_size=4", "data.val_fraction=0",
                                            "data.num_workers=2", "data.preload=false", "train.eval_every=100"])
    trainer, _ = train(config, f"{folder}/{{00000..00002}}.tar", tmp_path / "run")
    epochs = [[i for rows, _ in seen[e * 3:(e + 1) * 3] for i in rows] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]  # shuffled again each epoch
    for rows, images in seen:  # each row got its own image, read from its shard by a worker
        for index, image in zip(rows, images):
            color = COLORS[colors[trainer.train_set.samples[index].image.key.rpartition("#")[2]]]
            expected = torch.tensor(color, dtype=torch.float32) / 127.5 - 1
            torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.04, rtol=0)


def test_resume_mid_epoch_continues_with_the_same_next_sample(shards, tmp_path, monkeypatch):
    folder, _ = shards
    data = f"{folder}/*.tar"
    overrides = ["train.batch_size=2", "data.val_fraction=0", "data.preload=false", "train.eval_every=100"]
    seen = record_batches(monkeypatch)
    train(load_config("tiny", overrides=overrides + ["train.max_steps=5"]), data, tmp_path / "whole")
    whole = [rows for rows, _ in seen]
    seen.clear()
    # 6 batches an epoch: stopping after 2 leaves the run in the middle of the first epoch.
    train(load_config("tiny", overrides=overrides + ["train.max_steps=2"]), data, tmp_path / "parts")
    config = load_config("tiny", overrides=overrides + ["train.max_steps=5", "data.num_workers=2"])
    train(config, data, tmp_path / "parts", resume=True, compare_config=True)
    assert [rows for rows, _ in seen] == whole and len(whole) == 5


def forged_huge_member(path, name, size):
    """A tar whose one member's header says ``size`` bytes; the data are a hole in a sparse file."""
    info = tarfile.TarInfo(name)
    info.size = size
    with open(path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(f.tell() + size + 2 * tarfile.BLOCKSIZE)
    return path


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


GOOD = [("0.jpg", png(COLORS[0], "JPEG")), ("0.txt", b"a red square")]
HOSTILE = {
    "dotdot": ([("../1.jpg", png(COLORS[1])), ("../1.txt", b"up")],
               r"member '../1.jpg' has a name with '..' that points outside the shard$"),
    "absolute": ([("/etc/1.jpg", png(COLORS[1]))], r"member '/etc/1.jpg' has an absolute name$"),
    "symlink": ([special("1.jpg", tarfile.SYMTYPE, "/etc/passwd"), ("1.txt", b"x")],
                r"member '1.jpg' is a link \(to '/etc/passwd'\); only regular files are read$"),
    "hardlink": ([special("1.png", tarfile.LNKTYPE, "0.jpg"), ("1.txt", b"x")],
                 r"member '1.png' is a link \(to '0.jpg'\); only regular files are read$"),
    "device": ([special("1.jpg", tarfile.CHRTYPE), ("1.txt", b"x")],
               r"member '1.jpg' is a device, pipe or other special file; only regular files are read$"),
    "fifo": ([special("1.txt", tarfile.FIFOTYPE), ("1.jpg", png(COLORS[1]))],
             r"member '1.txt' is a device, pipe or other special file; only regular files are read$"),
    "sparse": ([special("1.jpg", tarfile.GNUTYPE_SPARSE), ("1.txt", b"x")],
               r"member '1.jpg' is a device, pipe or other special file; only regular files are read$"),
    "no text": ([("1.jpg", png(COLORS[1]))], r"key '1' has an image but no txt or json text$"),
    "no image": ([("1.json", b'{"caption": "x"}')], r"key '1' has text but no image$"),
    "two images": ([("1.jpg", png(COLORS[1], "JPEG")), ("1.png", png(COLORS[1])), ("1.txt", b"x")],
                   r"key '1' has 2 images \(1.jpg, 1.png\)$"),
    "one extension twice": ([("1.jpg", png(COLORS[1])), ("1.JPG", png(COLORS[1])), ("1.txt", b"x")],
                            r"key '1' has two jpg members$"),
    "empty caption": ([("1.jpg", png(COLORS[1])), ("1.txt", b"  \n")], r"empty caption$"),
    "bad json": ([("1.jpg", png(COLORS[1])), ("1.json", b'{"caption": ')],
                 r"not valid JSON: Expecting value at column 13$"),
    "twice": ([("1.jpg", png(COLORS[1])), ("1.txt", b"x"), ("1.txt", b"y")], r"member '1.txt' appears twice$"),
    "huge text": ([("1.jpg", png(COLORS[1])), ("1.txt", b"x" * (MiB + 1))],
                  rf"member '1.txt' is {MiB + 1} bytes, over the 1 MiB limit for a txt member$"),
}


def files_under(folder):
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_member_is_refused_in_one_line_naming_shard_and_member_or_skipped(tmp_path, monkeypatch, case,
                                                                                    name):
    members, message = HOSTILE[case]
    # Where tarfile would write a member: the working directory (1.jpg), its parent (../1.jpg), an
    # absolute path (/etc/1.jpg); the shard's own folder too. All of them are watched.
    work, shard = tmp_path / "work", tmp_path / "shards" / name
    work.mkdir(), shard.parent.mkdir()
    monkeypatch.chdir(work)
    write_tar(shard, GOOD + members)
    before = files_under(tmp_path)
    first = members[0] if isinstance(members[0], tarfile.TarInfo) else tarfile.TarInfo(members[0][0])
    key = re.escape(first.name.rsplit(".", 1)[0])  # the row's __key__: its members' name without the extension
    with pytest.raises(DataError, match=rf"^{shard}: row 2 \(key '{key}'\): {message}") as err:
        read_shards(shard)
    assert "\n" not in str(err.value)
    samples, skipped = read_shards(shard, on_bad_row="skip")
    assert [s.row for s in samples] == [1] and len(skipped) == 1
    assert open_image(samples[0].image).size == (16, 16)  # the good row's image read, from the shard
    assert files_under(tmp_path) == before and not os.path.exists("/etc/1.jpg")  # nothing extracted


def test_compressed_shards_read_as_their_tar(shards, tmp_path):
    folder, _ = shards
    plain, _ = read_shards(f"{folder}/{{00000..00002}}.tar")
    for k, suffix in enumerate([".tgz", ".tar.gz", ".TAR.GZ"]):
        with tarfile.open(folder / f"{k:05d}.tar") as tar:
            write_tar(tmp_path / f"{k:05d}{suffix}", [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()])
    assert [s.turns for s in read_data(tmp_path / "00000.tgz", DataConfig())[0]] == [s.turns for s in plain[:4]]
    packed = [s for k, suffix in enumerate([".tgz", ".tar.gz", ".TAR.GZ"])
              for s in read_shards(tmp_path / f"{k:05d}{suffix}")[0]]
    assert [s.turns for s in packed] == [s.turns for s in plain]
    assert [s.image.read_bytes() for s in packed] == [s.image.read_bytes() for s in plain]
    assert [s.label for s in packed] == [s.label for s in plain] == [f"key '{k:05d}{i:04d}'" for k in range(3)
                                                                     for i in range(4)]
    assert len({image_key(s.image) for s in packed}) == 12
    assert pickle.loads(pickle.dumps(packed[1].image)) == packed[1].image  # travels to DataLoader workers


def test_a_damaged_compressed_shard_is_refused_in_one_line(tmp_path):
    shard = write_tar(tmp_path / "t.tar.gz", GOOD + [("1.jpg", png(COLORS[1])), ("1.txt", b"a green square")])
    shard.write_bytes(shard.read_bytes()[:-30])  # the gzip stream's end cut off
    with pytest.raises(DataError, match=r"t.tar.gz: row \d \(key '\d'\): shard is truncated or damaged after member"):
        read_shards(shard)
    (tmp_path / "x.tgz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x.tgz: not a gzip-compressed tar file"):
        read_shards(tmp_path / "x.tgz")


@pytest.mark.parametrize("name", ["s.tar", "s.tgz"])
def test_an_image_that_does_not_decode_is_named_by_shard_and_key(tmp_path, name):
    shard = write_tar(tmp_path / name, GOOD + [("k7.jpg", b"not a jpeg"), ("k7.txt", b"x")])
    samples, _ = read_shards(shard)
    tok = Tokenizer.train(["a red square x"], "char", 0)
    with pytest.raises(DataError, match=rf"^{shard}: row 2 \(key 'k7'\): cannot decode image"):
        ImageTextDataset(samples, tok, ScratchImages(8), 40)


def test_a_member_over_the_image_limit_is_refused_from_its_header(tmp_path):
    shard = forged_huge_member(tmp_path / "huge.tar", "0.jpg", 65 * MiB)
    assert os.stat(shard).st_blocks * 512 < MiB  # a hole: the test writes nothing like 65 MiB
    with pytest.raises(DataError, match=rf"huge.tar: row 1 \(key '0'\): member '0.jpg' is {65 * MiB} bytes, over "
                                        r"the 64 MiB limit for a jpg member$"):
        read_shards(shard)


def test_a_truncated_shard_is_refused_or_its_whole_members_kept(tmp_path):
    members = GOOD + [("1.jpg", png(COLORS[1])), ("1.txt", b"a green square")]
    shard = write_tar(tmp_path / "t.tar", members)
    with tarfile.open(shard) as tar:
        image = tar.getmember("1.jpg")
    os.truncate(shard, image.offset_data + 10)  # inside 1.jpg's data
    needs, has = image.offset_data + image.size, image.offset_data + 10
    with pytest.raises(DataError, match=rf"t.tar: row 2 \(key '1'\): shard is truncated: member '1.jpg' needs "
                                        rf"{needs} bytes, the file has {has}$"):
        read_shards(shard)
    samples, skipped = read_shards(shard, on_bad_row="skip")
    assert [s.turns for s in samples] == [[("", "a red square")]] and len(skipped) == 1
    assert "shard is truncated" in str(skipped)


def test_a_shard_cut_between_members_or_with_a_damaged_header_is_refused(tmp_path):
    shard = write_tar(tmp_path / "t.tar", GOOD + [("1.jpg", png(COLORS[1])), ("1.txt", b"a green square")])
    with tarfile.open(shard) as tar:
        second = tar.getmember("1.jpg").offset
    whole = shard.read_bytes()
    shard.write_bytes(whole[:second])  # no member is cut, but the rest and the end blocks are gone
    with pytest.raises(DataError, match=rf"t.tar: row 2: shard is truncated or damaged: it ends at byte {second}, "
                                        "not at the tar end-of-archive blocks$"):
        read_shards(shard)
    shard.write_bytes(whole[:second] + b"\x07" * 512 + whole[second + 512:])
    with pytest.raises(DataError, match=rf"it has a damaged header at byte {second}, not at"):
        read_shards(shard)


def test_a_compressed_or_foreign_file_is_not_taken_for_a_shard(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(DataError, match=r"x.tar: not an uncompressed tar file"):
        read_shards(tmp_path / "x.tar")


def test_a_hostile_shard_stops_the_cli_with_exit_code_2(tmp_path, capsys):
    shard = write_tar(tmp_path / "s.tar", GOOD + HOSTILE["symlink"][0])
    code = main(["train", "--data", str(shard), "--preset", "tiny", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "s.tar: row 2 (key '1'): member '1.jpg' is a link (to '/etc/passwd')" in err
