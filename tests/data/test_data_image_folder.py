"""Image folders with sidecar captions: rows in sorted order, subfolders, missing captions and
symlinks pointing outside refused as bad rows before any image is read."""

import os

import pytest
from formats import png, write_image_folder

from moevlm.config import load_config
from moevlm.data.dataset import ImageTextDataset
from moevlm.data.image_folder import read_image_folder
from moevlm.data.images import ScratchImages
from moevlm.data.sources import read_data
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import DataError


def test_each_image_and_its_caption_file_make_a_row(tmp_path):
    folder = write_image_folder(tmp_path / "pics", rows=3)
    (folder / "sub").mkdir()
    (folder / "sub" / "z.png").write_bytes(png("red"))
    (folder / "sub" / "z.txt").write_text("  nested red  \n")
    (folder / "notes.md").write_text("ignored")
    samples, _ = read_data(folder, load_config("tiny").data)
    assert [os.path.relpath(s.image, folder) for s in samples] == ["000.png", "001.png", "002.png", "sub/z.png"]
    assert samples[1].turns == [("", "a green square")] and samples[3].turns == [("", "nested red")]


def test_an_image_without_its_caption_file_is_a_bad_row(tmp_path):
    folder = write_image_folder(tmp_path / "pics", rows=3)
    (folder / "001.txt").unlink()
    with pytest.raises(DataError, match=r"pics: row 2 \('001.png'\): no caption file '001.txt'$"):
        read_image_folder(folder)
    samples, skipped = read_image_folder(folder, on_bad_row="skip")
    assert len(samples) == 2 and str(skipped).startswith("1 bad row: 1 no caption file ...")


@pytest.mark.parametrize("link", ["001.png", "001.txt"])
def test_symlinks_pointing_outside_are_refused(tmp_path, link):
    folder = write_image_folder(tmp_path / "pics", rows=3)
    (tmp_path / "secret").write_text("do not read")
    (folder / link).unlink()
    (folder / link).symlink_to(tmp_path / "secret")
    with pytest.raises(DataError) as info:
        read_image_folder(folder)
    assert str(info.value) == f"{folder}: row 2 ('001.png'): symlink {link!r} points outside the folder"


def test_a_symlink_inside_the_folder_is_fine(tmp_path):
    folder = write_image_folder(tmp_path / "pics", rows=2)
    (folder / "001.png").unlink()
    (folder / "001.png").symlink_to(folder / "000.png")
    samples, _ = read_image_folder(folder)
    assert len(samples) == 2


def test_a_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files \(.jpg"):
        read_data(tmp_path / "empty", load_config("tiny").data)


def test_an_image_that_does_not_decode_is_named_by_its_file(tmp_path):
    folder = write_image_folder(tmp_path / "pics", rows=3)
    (folder / "001.png").write_bytes(b"not a png")
    samples, _ = read_image_folder(folder)
    tok = Tokenizer.train(["a red green blue square"], "char", 0)
    with pytest.raises(DataError, match=r"pics: row 2 \('001.png'\): cannot decode image"):
        ImageTextDataset(samples, tok, ScratchImages(8), 40)
    skipping = ImageTextDataset(samples, tok, ScratchImages(8), 40, on_bad_row="skip")
    assert str(skipping.skipped).startswith(f"1 bad row: 1 cannot decode image (first: {folder} row 2 ('001.png'): ")
