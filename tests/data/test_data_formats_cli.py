"""The `tiny` preset trains on each data format through the CLI, and `eval` reads them too."""

import json
import shutil

import datasets
import pytest
from formats import hf_dataset, write_coco, write_image_folder, write_mixed_llava

from moevlm.cli import main


def train(data, out, *settings):
    argv = ["train", "--data", str(data), "--preset", "tiny", "--out", str(out), "--set", "train.max_steps=2",
            "--set", "data.val_fraction=0.25", "--set", "train.val_generate=2"]
    for setting in settings:
        argv += ["--set", setting]
    return main(argv)


def trained_rows(out) -> int:
    state = json.loads((out / "trainer_state.json").read_text())
    return state["step"]


def test_coco_captions_train_and_eval_with_every_reference(tmp_path, capsys):
    data = write_coco(tmp_path / "coco")
    assert train(data, tmp_path / "run") == 0
    assert trained_rows(tmp_path / "run") == 2
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 12  # every caption is a row for the loss ...


def test_mixed_llava_file_with_text_only_rows_trains_and_evaluates(tmp_path, capsys):
    (tmp_path / "llava").mkdir()
    data = write_mixed_llava(tmp_path / "llava")
    assert train(data, tmp_path / "run") == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 8


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "arrow"])
def test_hugging_face_dataset_trains(tmp_path, monkeypatch, form):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    dataset = hf_dataset(rows=8, text="conversations")
    if form == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        data = tmp_path / "saved"
    elif form == "parquet":
        data = tmp_path / "train.parquet"
        dataset.to_parquet(str(data))
    else:
        dataset.save_to_disk(str(tmp_path / "saved"))
        data = tmp_path / "train.arrow"
        shutil.copy(next((tmp_path / "saved").glob("*.arrow")), data)
    assert train(data, tmp_path / "run", "data.preload=false") == 0
    assert trained_rows(tmp_path / "run") == 2


def test_image_folder_trains(tmp_path):
    data = write_image_folder(tmp_path / "pictures")
    assert train(data, tmp_path / "run") == 0
    assert trained_rows(tmp_path / "run") == 2


@pytest.mark.usefixtures("offline")
def test_a_pretrained_lm_trains_and_evaluates_on_mixed_rows(tmp_path, capsys, pretrained_parts):
    (tmp_path / "llava").mkdir()
    data = write_mixed_llava(tmp_path / "llava")
    assert train(data, tmp_path / "run", f"model.lm=hf:{pretrained_parts['gpt2']}", "train.batch_size=4",
                 "decoder.max_text_len=96") == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 8


def test_parquet_streams_through_dataloader_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "train.parquet"
    hf_dataset(rows=8).to_parquet(str(data))
    assert train(data, tmp_path / "run", "data.preload=false", "data.num_workers=2") == 0
    assert trained_rows(tmp_path / "run") == 2


def test_eval_resolves_coco_images_by_its_own_image_root(tmp_path, capsys):
    train_file = write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "train2017").rename(tmp_path / "coco" / "train_pictures")
    assert train(train_file, tmp_path / "run", f"data.image_root={tmp_path / 'coco' / 'train_pictures'}") == 0
    val_file = write_coco(tmp_path / "val", split="val2017")
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(val_file), "--json"]) == 0  # val2017/
    (tmp_path / "val" / "val2017").rename(tmp_path / "val" / "elsewhere")
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(val_file), "--json",
                 "--image-root", str(tmp_path / "val" / "elsewhere")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["num_samples"] == 12
