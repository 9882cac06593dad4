"""Hostile input through the real CLI: handled correctly, or one line naming the file, the row and
the problem, exit code 2 and no traceback."""

import base64
import csv
import io
import json
import re
import shutil

import pytest
from PIL import Image

from hostile import huge_png
from moevlm.checkpoint import CHECKSUMS, sha256
from moevlm.cli import main


def png(color=(200, 30, 30), size=(16, 16), mode="RGB", fmt="PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def image_csv(folder, rows, header=("image", "caption")):
    """ok.png is a good first row; ``rows`` follow it."""
    (folder / "ok.png").write_bytes(png())
    path = folder / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([("ok.png", "a red square")] + rows)
    return path


def with_file(folder, name, data: bytes, caption="a bad one"):
    (folder / name).write_bytes(data)
    return image_csv(folder, [(name, caption)])


def seed_csv(folder, cell):
    path = folder / "seed.csv"
    good = base64.b64encode(png()).decode()
    path.write_text(f"b64string_images,caption\n{good},a red square\n{cell},a bad one\n")
    return path


def raw(folder, name, data: bytes):
    (folder / name).write_bytes(data)
    return folder / name


# (id, build(folder) -> data file, row or None, problem)
BAD = [
    ("truncated image", lambda d: with_file(d, "cut.png", png(size=(64, 64))[:80]), 2, "cannot decode image: "),
    ("zero-byte image", lambda d: with_file(d, "empty.png", b""), 2, "cannot decode image: empty file"),
    ("zero-byte data file", lambda d: raw(d, "d.csv", b""), None, "no usable rows"),
    ("wrong base64", lambda d: seed_csv(d, "iVBORw0KGgo!!!"), 2, "cannot decode image: not valid base64"),
    ("base64 of no image", lambda d: seed_csv(d, base64.b64encode(b"just text").decode()), 2,
     "cannot decode image: not in an image format Pillow can read"),
    ("20000x20000 image", lambda d: with_file(d, "huge.png", huge_png(20_000, 20_000)), 2,
     f"cannot decode image: more than {Image.MAX_IMAGE_PIXELS} pixels"),
    ("decompression bomb", lambda d: with_file(d, "bomb.png", huge_png(12_000, 12_000)), 2,
     f"cannot decode image: more than {Image.MAX_IMAGE_PIXELS} pixels"),
    ("non-UTF-8 caption", lambda d: raw(d, "d.jsonl", b'{"image": "x.png", "caption": "caf\xe9"}\n'), 1,
     "text is not valid UTF-8"),
    # 119 characters once stripped, plus <bos> and <eos>
    ("caption over the context", lambda d: image_csv(d, [("ok.png", "red " * 30)]), 2,
     "text is 121 tokens, longer than decoder.max_text_len 24"),
    ("missing column", lambda d: image_csv(d, [], header=("image", "text")), None,
     "missing column 'caption' (have: image, text)"),
    ("empty data set", lambda d: raw(d, "d.csv", b"image,caption\n"), None, "no usable rows"),
    ("JSON path outside its folder", lambda d: raw(d, "d.json", b'[{"image": "../x.png", "caption": "x"}]'), 1,
     "image path '../x.png' points outside the data folder"),
    ("JSON absolute path outside", lambda d: raw(d, "d.json", b'[{"image": "/etc/passwd", "caption": "x"}]'), 1,
     "image path '/etc/passwd' points outside the data folder"),
    ("JSON nested too deeply", lambda d: raw(d, "d.jsonl", b"[" * 100_000), 1, "not valid JSON: nested too deeply"),
    ("data file is a folder", lambda d: (d / "d.csv").mkdir() or d / "d.csv", None, "cannot read data file"),
]


def train(capsys, data, out, *extra):
    code = main(["train", "--data", str(data), "--preset", "tiny", "--out", str(out), "--no-tracking",
                 "--set", "train.max_steps=1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, where, problem):
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"moevlm: error: {where}: ") and problem in err, err


@pytest.mark.parametrize("build,row,problem", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_data_gives_one_line_naming_file_row_and_problem(tmp_path, capsys, build, row, problem):
    (tmp_path / "data").mkdir()
    data = build(tmp_path / "data")
    code, _, err = train(capsys, data, tmp_path / "run")
    assert_one_line_error(code, err, f"{data}: row {row}" if row else data, problem)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return png((30, 30, 200), size=(20, 10), fmt="JPEG", exif=exif)


def test_odd_but_valid_data_trains(tmp_path, capsys):
    """Every Pillow mode, EXIF rotation, extra columns, duplicate rows: all read, duplicates counted once."""
    images = {"l.png": png(90, mode="L"), "la.png": png((90, 200), mode="LA"), "p.png": png(3, mode="P"),
              "rgba.png": png((1, 2, 3, 128), mode="RGBA"), "cmyk.tif": png((0, 255, 255, 0), mode="CMYK", fmt="TIFF"),
              "i16.png": png(40000, mode="I;16"), "rotated.jpg": exif_rotated_jpeg()}
    rows = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        rows.append([name, f"a {name} picture", "extra", "cells"])
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "source", "licence"])
        writer.writerows(rows + rows)  # every row twice
    code, out, err = train(capsys, path, tmp_path / "run", "--set", "data.val_fraction=0.3")
    assert code == 0, err
    assert "validation loss" in out and "on 2 rows" in out  # floor(7 unique rows * 0.3), not floor(14 * 0.3)
    assert re.search(r"^step 1: val loss [0-9.]+, exact match [0-9.]+ on 2 rows \(validation took [0-9.]+ s\) "
                     r"\(new best\)$", out, re.MULTILINE), out


def test_skipped_rows_are_counted_by_reason(tmp_path, capsys, caplog):
    cut = png(size=(64, 64))[:80]
    for name in ("cut1.png", "cut2.png"):
        (tmp_path / name).write_bytes(cut)
    data = image_csv(tmp_path, [("cut1.png", "a cut one"), ("ok.png", " "), ("cut2.png", "another"),
                                ("../x.png", "outside"), ("ok.png", "a red square again")])
    code, _, err = train(capsys, data, tmp_path / "run", "--set", "data.on_bad_row=skip")
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"data.on_bad_row=skip: skipped 4 bad rows: 2 cannot decode image (first: {data} row 2: cannot decode image: "
        f"image file is truncated), 1 empty caption (first: {data} row 3), 1 image path ... points outside the data "
        f"folder (first: {data} row 5: image path '../x.png' points outside the data folder)"]


@pytest.mark.parametrize("preload,workers", [(True, 0), (False, 0), (False, 1)])
def test_an_image_file_that_cannot_be_read_stops_the_run_even_when_skipping(tmp_path, capsys, monkeypatch,
                                                                            preload, workers):
    from moevlm.data import images

    data = with_file(tmp_path, "locked.png", png())
    reads = []

    def locked(path, *args, **kwargs):  # root reads any file, whatever its mode
        if path.endswith("locked.png"):
            reads.append(path)
            if preload or len(reads) > 1:  # without preload: there when checked, gone when decoded
                raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", locked, raising=False)
    code, _, err = train(capsys, data, tmp_path / "r", "--set", "data.on_bad_row=skip", "--set", "data.val_fraction=0",
                         "--set", f"data.preload={str(preload).lower()}", "--set", f"data.num_workers={workers}")
    assert_one_line_error(code, err, f"{data}: row 2", f"cannot read image file {tmp_path / 'locked.png'}: "
                                                       "Permission denied")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two one-step runs of different widths."""
    from shapes import write_shapes_csv

    root = tmp_path_factory.mktemp("models")
    data = write_shapes_csv(root / "shapes.csv")
    for name, width in (("narrow", 32), ("wide", 64)):
        assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(root / name), "--no-tracking",
                     "--set", "train.max_steps=1", "--set", f"decoder.width={width}"]) == 0
    (root / "image.png").write_bytes(png())
    return root


def test_checkpoint_with_weights_of_another_config(models, tmp_path, capsys):
    run = shutil.copytree(models / "narrow", tmp_path / "run")
    shutil.copy(models / "wide" / "model.safetensors", run / "model.safetensors")
    code, err = run_cli(capsys, "caption", "--model", run, models / "image.png")
    assert_one_line_error(code, err, run / "model.safetensors", "checksum mismatch")
    manifest = json.loads((run / CHECKSUMS).read_text())
    manifest["sha256"]["model.safetensors"] = sha256(run / "model.safetensors")
    (run / CHECKSUMS).write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "eval", "--model", run, "--data", models / "shapes.csv")
    assert_one_line_error(code, err, run / "model.safetensors", "weights do not fit config.json")


def test_truncated_checkpoint_for_caption_and_resume(models, tmp_path, capsys):
    run = shutil.copytree(models / "narrow", tmp_path / "run")
    for weights in (run / "model.safetensors", run / "checkpoints" / "step-00000001" / "model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(capsys, "caption", "--model", run, models / "image.png")
    assert_one_line_error(code, err, run / "model.safetensors", "checksum mismatch")
    code, err = run_cli(capsys, "train", "--data", models / "shapes.csv", "--out", run, "--resume", "--no-tracking")
    assert_one_line_error(code, err, run, "no checkpoint to resume from passed its checks")


def conversation_json(folder, prompts):
    (folder / "ok.png").write_bytes(png())
    rows = [{"image": "ok.png", "conversations": [{"from": "human", "value": prompt},
                                                 {"from": "gpt", "value": "red"}]} for prompt in prompts]
    (folder / "c.json").write_text(json.dumps(rows))
    return folder / "c.json"


def test_bad_pretrained_sources_and_stage_arguments_give_one_line(pretrained_parts, tmp_path, capsys, offline):
    data = conversation_json(tmp_path, ["<image>\nWhat colour?", "<image> and <image>?"])
    pretrained = ["--set", f"model.vision=hf:{pretrained_parts['clip']}",
                  "--set", f"model.lm=hf:{pretrained_parts['llama']}", "--set", "decoder.max_text_len=96"]
    code, _, err = train(capsys, data, tmp_path / "r", *pretrained)
    assert_one_line_error(code, err, data, "row 2: 2 <image> placeholders for 1 image")
    data = conversation_json(tmp_path, ["<image>\nWhat colour?"] * 3)
    code, _, err = train(capsys, data, tmp_path / "r", "--set", f"model.lm=hf:{tmp_path / 'nothing'}")
    assert_one_line_error(code, err, f"model.lm.pretrained '{tmp_path / 'nothing'}'", "no such folder")
    code, _, err = train(capsys, data, tmp_path / "r", "--set", "model.lm=hf:nobody/nothing")
    assert_one_line_error(code, err, "model.lm.pretrained 'nobody/nothing'", "HF_HUB_OFFLINE=1 needs a local folder")
    code, _, err = train(capsys, data, tmp_path / "r", "--set", f"model.lm=hf:{pretrained_parts['clip']}")
    assert_one_line_error(code, err, f"model.lm.pretrained '{pretrained_parts['clip']}'", "not a causal LM")
    code, _, err = train(capsys, data, tmp_path / "r", "--from", str(tmp_path))
    assert_one_line_error(code, err, tmp_path, "config.json is missing")
    code, err = run_cli(capsys, "upcycle", "--model", tmp_path, "--experts", "2", "--top-k", "3",
                        "--out", tmp_path / "u")
    assert_one_line_error(code, err, tmp_path, "config.json is missing")


def test_a_checkpoint_whose_pretrained_source_is_gone_names_it(pretrained_parts, tmp_path, capsys, offline):
    source = tmp_path / "llama"
    shutil.copytree(pretrained_parts["llama"], source)
    data = conversation_json(tmp_path, ["<image>\nWhat colour?"] * 3)
    code, _, err = train(capsys, data, tmp_path / "r", "--stage", "pretrain", "--set", f"model.lm=hf:{source}",
                         "--set", f"model.vision=hf:{pretrained_parts['clip']}", "--set", "decoder.max_text_len=96")
    assert code == 0, err
    shutil.rmtree(source)
    code, err = run_cli(capsys, "caption", "--model", tmp_path / "r", tmp_path / "ok.png")
    assert_one_line_error(code, err, tmp_path / "r", "loads its untrained pretrained weights from")
    assert f"model.lm.pretrained '{source}': no such folder" in err
    code, err = run_cli(capsys, "upcycle", "--model", tmp_path / "r", "--experts", "2", "--top-k", "3",
                        "--out", tmp_path / "u")
    assert_one_line_error(code, err, tmp_path / "r", "no such folder")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_fails_only_when_decoded_in_a_worker_gives_one_line(tmp_path, capsys, workers):
    data = with_file(tmp_path, "cut.png", png(size=(64, 64))[:80])  # a whole header, the pixels cut off
    code, _, err = train(capsys, data, tmp_path / "r", "--set", "data.preload=false",
                         "--set", f"data.num_workers={workers}", "--set", "data.val_fraction=0")
    assert_one_line_error(code, err, data, "row 2: cannot decode image")
