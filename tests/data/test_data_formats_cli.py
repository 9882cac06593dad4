"""The `tiny` preset trains on each data format through the CLI, and `eval` reads them too.

``Seen`` records the rows the trainer trained on (file and row of each sample of every batch), so
a format that loses rows on the way fails here, not only one that cannot train at all."""

import json
import shutil

import datasets
import pytest
import torch
from formats import COLORS, hf_dataset, write_coco, write_image_folder, write_llava_with_repeats, write_mixed_llava

from moevlm.cli import main
from moevlm.config import load_config
from moevlm.data.training_data import load_training_data
from moevlm.train import run as run_module
from moevlm.train import trainer as trainer_module


def train(data, out, *settings):
    argv = ["train", "--data", str(data), "--preset", "tiny", "--out", str(out), "--set", "train.max_steps=2",
            "--set", "data.val_fraction=0.25", "--set", "train.val_generate=2"]
    for setting in settings:
        argv += ["--set", setting]
    return main(argv)


class Seen:
    """The training rows of the run and every (sample, prepared image) the trainer trained on."""

    def __init__(self, monkeypatch):
        self.data, self.trained = None, []
        load, usable = run_module.load_training_data, trainer_module.usable_batch

        def loading(*args, **kwargs):
            self.data = load(*args, **kwargs)
            return self.data

        def recording(batch, on_bad_row):
            batch = usable(batch, on_bad_row)
            samples = self.data.train_set.samples
            self.trained += [(samples[i], image) for i, image in zip(batch["index"].tolist(), batch["images"])]
            return batch

        monkeypatch.setattr(run_module, "load_training_data", loading)
        monkeypatch.setattr(trainer_module, "usable_batch", recording)

    def rows(self) -> set:
        """(file, row) of every row trained on, each once."""
        return {(sample.source, sample.row) for sample, _ in self.trained}


@pytest.fixture
def seen(monkeypatch):
    return Seen(monkeypatch)


def trained_rows(seen: Seen, rows: int) -> int:
    """How many distinct rows the run trained on (2 steps of 8 rows cover an epoch of up to 16),
    after checking that those and the validation rows are the data's ``rows`` rows, each once."""
    validation = [sample.row for sample in seen.data.val_set.samples]
    assert sorted([row for _, row in seen.rows()] + validation) == list(range(1, rows + 1))
    return len(seen.rows())


def summary(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("data: "))


def test_coco_captions_train_and_eval_with_every_reference(tmp_path, capsys, seen):
    data = write_coco(tmp_path / "coco")
    assert train(data, tmp_path / "run") == 0
    # 12 captions of 4 images; the 3 captions of 1 image (0.25) are held out.
    assert summary(capsys.readouterr().out) == "data: read 12 rows; dropped 0; train 9 rows, validation 3 rows"
    assert trained_rows(seen, rows=12) == 9
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 12  # every caption is a row for the loss ...


def test_every_run_says_what_it_read_dropped_and_split_and_logs_it_to_mlflow(tmp_path, capsys, seen):
    from mlflow import MlflowClient

    data = write_llava_with_repeats(tmp_path / "llava")
    assert train(data, tmp_path / "run", "data.val_fraction=0.1", "train.max_steps=3") == 0  # 3 x 8 rows: an epoch
    # 21 distinct rows (11 pictures, 10 text-only conversations) are 21 split groups: 2 held out.
    assert summary(capsys.readouterr().out) == (
        f"data: read 30 rows; dropped 9: 9 duplicate row (first: {data} row 22: duplicate row: same image "
        "and text as row 12); train 19 rows, validation 2 rows")
    assert trained_rows(seen, rows=21) == 19
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    params = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}").get_run(state["mlflow_run_id"]).data.params
    assert {key: params[f"data.{key}"] for key in ("rows_read", "rows_dropped", "train_rows", "val_rows",
                                                   "dedupe")} == {"rows_read": "30", "rows_dropped": "9",
                                                                  "train_rows": "19", "val_rows": "2",
                                                                  "dedupe": "drop"}
    assert params["data.dropped_reasons"].startswith("9 duplicate row (first: ")


def test_data_dedupe_keep_trains_on_repeats_and_keeps_them_on_one_side(tmp_path):
    data = write_llava_with_repeats(tmp_path / "llava")
    for seed in range(4):  # the held-out conversations differ by seed; none is ever on both sides
        config = load_config("tiny", overrides=["data.dedupe=keep", "data.val_fraction=0.3", f"train.seed={seed}"])
        loaded = load_training_data(config, data)
        turns = lambda dataset: {tuple(s.turns) for s in dataset.samples if s.image is None}  # noqa: E731
        assert loaded.summary.rows_read == 30 and len(loaded.summary.dropped) == 0
        assert len(loaded.train_set) + len(loaded.val_set) == 30
        assert not turns(loaded.train_set) & turns(loaded.val_set)
        assert len(turns(loaded.train_set) | turns(loaded.val_set)) == 10


def test_mixed_llava_file_with_text_only_rows_trains_and_evaluates(tmp_path, capsys):
    (tmp_path / "llava").mkdir()
    data = write_mixed_llava(tmp_path / "llava")
    assert train(data, tmp_path / "run") == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 8


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "arrow"])
def test_hugging_face_dataset_trains(tmp_path, monkeypatch, form, seen):
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
    assert trained_rows(seen, rows=8) == 6  # 2 held out


def test_image_folder_trains(tmp_path, capsys, seen):
    data = write_image_folder(tmp_path / "pictures")
    assert train(data, tmp_path / "run") == 0
    assert summary(capsys.readouterr().out) == "data: read 8 rows; dropped 0; train 6 rows, validation 2 rows"
    assert trained_rows(seen, rows=8) == 6


@pytest.mark.usefixtures("offline")
def test_a_pretrained_lm_trains_and_evaluates_on_mixed_rows(tmp_path, capsys, pretrained_parts):
    (tmp_path / "llava").mkdir()
    data = write_mixed_llava(tmp_path / "llava")
    assert train(data, tmp_path / "run", f"model.lm=hf:{pretrained_parts['gpt2']}", "train.batch_size=4",
                 "decoder.max_text_len=96") == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 8


def test_parquet_streams_through_dataloader_workers(tmp_path, monkeypatch, seen):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "train.parquet"
    hf_dataset(rows=8).to_parquet(str(data))
    assert train(data, tmp_path / "run", "data.preload=false", "data.num_workers=2") == 0
    assert trained_rows(seen, rows=8) == 6 and len(seen.trained) == 12  # 2 steps of 6: both epochs whole
    for sample, image in seen.trained:  # each row got its own picture, read from the file by a worker
        color = COLORS[sample.turns[0][1].split()[1]]  # "a red square"
        expected = torch.tensor(color, dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=0.02, rtol=0)


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
