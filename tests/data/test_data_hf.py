"""Hugging Face datasets: hf:NAME offline from a local source, save_to_disk folders, Parquet and
Arrow files; columns found or chosen; images left in the file until decoded; wrong schemas and
column types refused before any row is read."""

import json
import logging
import pickle
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from formats import COLORS, hf_dataset, png

from moevlm.config import load_config
from moevlm.data.arrow_images import ArrowImage, ParquetImage
from moevlm.data.dataset import ImageTextDataset
from moevlm.data.images import ScratchImages, open_image
from moevlm.data.sources import read_data
from moevlm.data.tokenizer import Tokenizer
from moevlm.errors import DataError


def data_cfg(*overrides):
    return load_config("tiny", overrides=list(overrides)).data


def test_save_to_disk_folder_rows_point_into_the_arrow_file(tmp_path):
    hf_dataset(rows=6).save_to_disk(str(tmp_path / "saved"))
    samples, _ = read_data(tmp_path / "saved", data_cfg())
    assert [s.turns for s in samples[:2]] == [[("", "a red square")], [("", "a green square")]]
    image = samples[2].image
    assert isinstance(image, ArrowImage) and image.row == 2
    assert pickle.loads(pickle.dumps(image)) == image  # travels to DataLoader workers
    assert open_image(image).getpixel((0, 0)) == COLORS["blue"]


def test_parquet_rows_are_read_by_row_group(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(hf_dataset(rows=10).data.table, path, row_group_size=4)
    samples, _ = read_data(path, data_cfg())
    assert [(s.image.group, s.image.row) for s in samples[3:6]] == [(0, 3), (1, 0), (1, 1)]
    assert isinstance(samples[9].image, ParquetImage)
    assert [open_image(s.image).getpixel((0, 0)) for s in samples[:5]] == [COLORS[c] for c in
                                                                        ["red", "green", "blue", "white", "red"]]


def test_streaming_a_parquet_file_reads_it_from_an_arrow_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "d.parquet"
    pq.write_table(hf_dataset(rows=10).data.table, path, row_group_size=4)
    samples, _ = read_data(path, data_cfg("data.preload=false"))
    assert all(isinstance(s.image, ArrowImage) for s in samples)
    assert samples[0].image.path.startswith(str(tmp_path / "cache")) and samples[0].source == str(path)
    assert [open_image(s.image).getpixel((0, 0)) for s in samples[4:6]] == [COLORS["red"], COLORS["green"]]


def test_hf_name_loads_offline_through_datasets(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read when datasets was imported
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "repo").mkdir()
    hf_dataset(rows=4).to_parquet(str(tmp_path / "repo" / "train.parquet"))
    samples, _ = read_data(f"hf:{tmp_path / 'repo'}:train", data_cfg())
    assert len(samples) == 4 and samples[0].source == f"hf:{tmp_path / 'repo'}:train"
    with pytest.raises(DataError, match=r"^hf:no/such-dataset-here: cannot load the data set \(HF_DATASETS_OFFLINE"):
        read_data("hf:no/such-dataset-here", data_cfg())


def test_conversation_columns_in_both_shapes_and_text_only_rows(tmp_path):
    table = pa.table({
        "images": [[{"bytes": png("red"), "path": None}], []],
        "messages": [[{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "red"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]]})
    pq.write_table(table, tmp_path / "chat.parquet")
    samples, _ = read_data(tmp_path / "chat.parquet", data_cfg())
    assert samples[0].turns == [("<image>\ncolour?", "red")] and samples[0].image is not None
    assert samples[1].turns == [("be brief\nhi", "hello")] and samples[1].image is None


def test_the_cauldron_shape_and_rows_with_several_images(tmp_path):
    one = {"bytes": png("red"), "path": None}
    table = pa.table({"images": [[one], [one, one]],
                      "texts": [[{"user": "colour?", "assistant": "red", "source": "x"},
                                 {"user": "sure?", "assistant": "yes", "source": "x"}],
                                [{"user": "two?", "assistant": "yes", "source": "x"}]]})
    pq.write_table(table, tmp_path / "cauldron.parquet")
    samples, skipped = read_data(tmp_path / "cauldron.parquet", data_cfg("data.on_bad_row=skip"))
    assert samples[0].turns == [("<image>\ncolour?", "red"), ("sure?", "yes")]
    assert str(skipped).startswith("1 bad row: 1 N images in the row; one image per row is supported (first: ")
    assert str(skipped).endswith("cauldron.parquet row 2: 2 images in the row; one image per row is supported)")


def test_columns_chosen_by_setting(tmp_path):
    table = pa.table({"jpg": [png("red")], "alt": ["a red square"], "caption": ["unused"]})
    pq.write_table(table, tmp_path / "d.parquet")
    samples, _ = read_data(tmp_path / "d.parquet", data_cfg("data.image_column=jpg", "data.text_column=alt"))
    assert samples[0].turns == [("", "a red square")]
    assert open_image(samples[0].image).getpixel((0, 0)) == COLORS["red"]


@pytest.mark.parametrize("columns, settings, problem", [
    ({"pixels": [b"x"], "label": [3]}, [], "no text column (looked for conversations, messages, texts, caption, text; "
                                           "have: pixels, label; set data.text_column)"),
    ({"pixels": [b"x"], "caption": ["a"]}, [], "no image column (looked for image, images; have: pixels, caption; "
                                               "set data.image_column)"),
    ({"image": [b"x"], "caption": [7]}, [], "column 'caption' is int64; expected text or a list of messages"),
    ({"image": [1.5], "caption": ["a"]}, [], "column 'image' is double; expected images"),
    ({"image": [b"x"], "caption": ["a"]}, ["data.text_column=alt"], "no column 'alt' (data.text_column; have: "),
])
def test_a_wrong_schema_is_refused_before_any_row_is_read(tmp_path, columns, settings, problem):
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")
    with pytest.raises(DataError) as info:
        read_data(tmp_path / "d.parquet", data_cfg(*settings))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'd.parquet'}: {problem}") and "\n" not in message


@pytest.mark.parametrize("name, kind", [("d.parquet", "Parquet"), ("d.arrow", "Arrow")])
def test_a_file_that_is_not_parquet_or_arrow(tmp_path, name, kind):
    (tmp_path / name).write_bytes(b"PAR1 this is not what it says")
    with pytest.raises(DataError, match=rf"{name}: not a readable {kind} file: "):
        read_data(tmp_path / name, data_cfg())


def test_bad_image_bytes_are_a_bad_row_of_the_dataset(tmp_path):
    pq.write_table(pa.table({"image": [png("red"), b"not an image"], "caption": ["a", "b"]}), tmp_path / "d.parquet")
    samples, _ = read_data(tmp_path / "d.parquet", data_cfg())
    with pytest.raises(DataError, match=r"d.parquet: row 2: cannot decode image: not in an image format"):
        ImageTextDataset(samples, Tokenizer.train(["ab"], "char", 0), ScratchImages(8), 20)


def test_streaming_keeps_images_in_the_file(tmp_path):
    path = tmp_path / "d.arrow"
    hf_dataset(rows=8).save_to_disk(str(tmp_path / "saved"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), path)
    samples, _ = read_data(path, data_cfg())
    tok = Tokenizer.train([s.turns[0][1] for s in samples], "char", 0)
    dataset = ImageTextDataset(samples, tok, ScratchImages(8), 40, preload=False)
    assert dataset.images is None
    assert dataset[5]["image"][:, 0, 0].tolist() == list(COLORS["green"])


def write_image_folder_dataset(folder, splits=("",)):
    """An ImageFolder as ``datasets`` reads it: images and a metadata.jsonl of their captions, per split folder."""
    for split in splits:
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, color in enumerate(["red", "green", "blue"]):
            (folder / split / f"{i}.png").write_bytes(png(color))
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"{split or 'one'} {color}"}))
        (folder / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_an_image_folder_with_metadata_reads_as_a_plain_folder_as_with_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = write_image_folder_dataset(tmp_path / "pics")
    samples, _ = read_data(folder, data_cfg())
    assert [s.turns for s in samples] == [[("", "one red")], [("", "one green")], [("", "one blue")]]
    assert open_image(samples[2].image).getpixel((0, 0)) == COLORS["blue"]
    assert [s.turns for s in read_data(f"hf:{folder}", data_cfg())[0]] == [s.turns for s in samples]


def test_a_data_set_with_splits_reads_train_and_says_so_or_the_split_chosen(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = write_image_folder_dataset(tmp_path / "pics", splits=("train", "test"))
    with caplog.at_level(logging.WARNING):
        samples, _ = read_data(folder, data_cfg())
    assert samples[0].turns == [("", "train red")]
    assert caplog.messages == [f"{folder}: reading split 'train', not 'test' (data.split chooses another)"]
    assert read_data(folder, data_cfg("data.split=test"))[0][0].turns == [("", "test red")]
    assert read_data(f"hf:{folder}:test", data_cfg())[0][0].turns == [("", "test red")]
    with pytest.raises(DataError, match=rf"^{folder}: no split 'dev' \(have: train, test\)$"):
        read_data(folder, data_cfg("data.split=dev"))
    with pytest.raises(DataError, match=r"names split 'test' but data.split is 'train'$"):
        read_data(f"hf:{folder}:test", data_cfg("data.split=train"))


def test_a_saved_dataset_dict_reads_train_and_says_so_or_the_split_chosen(tmp_path, caplog):
    datasets.DatasetDict({"validation": hf_dataset(rows=2), "train": hf_dataset(rows=5)}).save_to_disk(
        str(tmp_path / "saved"))
    with caplog.at_level(logging.WARNING):
        assert len(read_data(tmp_path / "saved", data_cfg())[0]) == 5
    assert caplog.messages == [f"{tmp_path / 'saved'}: reading split 'train', not 'validation' (data.split "
                               "chooses another)"]
    assert len(read_data(tmp_path / "saved", data_cfg("data.split=validation"))[0]) == 2
    datasets.DatasetDict({"a": hf_dataset(rows=2), "b": hf_dataset(rows=3)}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataError, match=r"ab: splits a, b: choose one with data.split$"):
        read_data(tmp_path / "ab", data_cfg())
