import base64
import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from moevlm.data.images import open_image
from moevlm.data.records import Sample, read_samples
from moevlm.errors import DataError


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def big_png_b64(tmp_path) -> str:
    # Noise does not compress, so the base64 cell is far over csv's default 128 KiB limit.
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    return base64.b64encode((tmp_path / "noise.png").read_bytes()).decode()


def test_seed_base64_csv_with_large_cells_and_extra_columns(tmp_path, image_bytes):
    big = big_png_b64(tmp_path)
    assert len(big) > 131072
    small = base64.b64encode(image_bytes((0, 0, 255))).decode()
    path = write_csv(tmp_path / "seed.csv", ["id", "b64string_images", "caption"],
                     [["1", big, " noise "], ["2", small, "a blue square"]])
    samples, skipped = read_samples(path)
    assert len(skipped) == 0
    assert samples == [Sample("data:;base64," + big, [("", "noise")], str(path), 1),
                       Sample("data:;base64," + small, [("", "a blue square")], str(path), 2)]
    assert open_image(samples[0].image).size == (300, 300)
    assert open_image(samples[1].image).getpixel((0, 0)) == (0, 0, 255)


def test_image_column_takes_relative_paths_base64_and_data_urls(tmp_path, image_bytes):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(image_bytes((255, 0, 0)))
    b64 = base64.b64encode(image_bytes((0, 255, 0))).decode()
    url = "data:image/png;base64," + base64.b64encode(image_bytes((0, 0, 255))).decode()
    path = write_csv(tmp_path / "d.csv", ["image", "caption"],
                     [[" imgs/red.png ", "red"], [b64, "green"], [url, "blue"]])
    samples, _ = read_samples(path)
    assert [s.image for s in samples] == [str(tmp_path / "imgs" / "red.png"), b64, url]
    assert os.path.isabs(samples[0].image)
    colours = [open_image(s.image).getpixel((0, 0)) for s in samples]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_paths_are_resolved_against_the_data_folder_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write_csv(tmp_path / "sub" / "d.csv", ["image", "caption"], [["./a/../x.png", "x"]])
    monkeypatch.chdir(tmp_path)
    samples, _ = read_samples("sub/d.csv")
    assert samples[0].image == str(tmp_path / "sub" / "x.png")
    assert samples[0].source == "sub/d.csv"


def test_jsonl_captions_and_conversations_with_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"image": "a.png", "caption": "a cat"}) + "\n\n   \n"
        + json.dumps({"image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": " A dog. "}]}) + "\n",
        encoding="utf-8")
    samples, skipped = read_samples(path)
    assert len(skipped) == 0
    assert [(s.row, s.turns) for s in samples] == [(1, [("", "a cat")]), (4, [("<image>\nWhat is it?", "A dog.")])]


def test_llava_json_multi_turn(tmp_path):
    items = [{"id": "x", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Black."},
        {"from": "human", "value": ""}, {"from": "gpt", "value": "Caption."}]},
        {"image": "y.png", "caption": "plain"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    samples, _ = read_samples(path)
    # Prompts keep the placeholder: the tokenizer places the image there (or drops it).
    assert samples[0].turns == [("<image>\nWhat is this?", "A cat."), ("What colour?", "Black."), ("", "Caption.")]
    assert samples[0].image == str(tmp_path / "x.png")
    assert [s.row for s in samples] == [1, 2]


def test_llava_json_takes_user_assistant_and_system_roles_as_the_parquet_reader_does(tmp_path):
    human_gpt = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
                 {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Black."}]
    roles = [{"from": "user", "value": "<image>\nWhat is this?"}, {"from": "assistant", "value": "A cat."},
             {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Black."}]
    system = [{"role": "system", "content": "Answer briefly."}] + human_gpt
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"image": "x.png", "conversations": c} for c in (human_gpt, roles, system)]))
    samples, _ = read_samples(path)
    assert samples[1].turns == samples[0].turns == [("<image>\nWhat is this?", "A cat."), ("What colour?", "Black.")]
    # The system text goes before the first prompt, as the Parquet reader puts it.
    assert samples[2].turns == [("Answer briefly.\n<image>\nWhat is this?", "A cat."), ("What colour?", "Black.")]


def test_max_rows_caps_kept_samples(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["image", "caption"], [[f"{i}.png", f"c{i}"] for i in range(5)])
    samples, _ = read_samples(path, max_rows=2)
    assert [s.turns[0][1] for s in samples] == ["c0", "c1"]


GOOD = {"image": "ok.png", "caption": "fine"}


def _csv_bad(tmp_path, rows):
    return write_csv(tmp_path / "d.csv", ["image", "caption"], [["ok.png", "fine"]] + rows)


# (name, build(tmp_path) -> path, bad row, problem text); each file also holds good rows.
BAD_ROWS = [
    ("empty caption", lambda p: _csv_bad(p, [["a.png", "   "]]), 2, "empty caption"),
    ("missing image", lambda p: _csv_bad(p, [["", "text"]]), 2, "missing image"),
    ("short row", lambda p: _csv_bad(p, [["a.png"]]), 2, "missing caption"),
    ("outside folder", lambda p: _csv_bad(p, [["../secret.png", "x"]]), 2,
     "image path '../secret.png' points outside the data folder"),
    ("csv not utf-8", lambda p: _raw(p / "d.csv", b"image,caption\nok.png,fine\nb.png,caf\xe9\n"), 2,
     "not valid UTF-8"),
    ("bad json line", lambda p: _raw(p / "d.jsonl", (json.dumps(GOOD) + "\n{oops\n").encode()), 2,
     "not valid JSON"),
    ("jsonl not utf-8", lambda p: _raw(p / "d.jsonl", (json.dumps(GOOD) + "\n").encode()
                                       + b'{"image": "a.png", "caption": "\xff"}\n'), 2, "not valid UTF-8"),
    ("not alternating", lambda p: _json(p, [GOOD, {"image": "a.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}]), 2,
     "conversation not alternating human/gpt"),
    ("odd messages", lambda p: _json(p, [GOOD, {"image": "a.png", "conversations": [
        {"from": "human", "value": "q"}]}]), 2, "expected human/gpt pairs"),
    ("empty answer", lambda p: _json(p, [GOOD, {"image": "a.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": " \n"}]}]), 2, "empty answer 1"),
    ("json missing image", lambda p: _json(p, [{"caption": "x"}, GOOD]), 1, "missing image"),
    ("json not an object", lambda p: _json(p, [GOOD, ["a.png", "x"]]), 2, "expected a JSON object"),
    ("json outside folder", lambda p: _json(p, [GOOD, {"image": "imgs/../../x.png", "caption": "x"}]), 2,
     "image path 'imgs/../../x.png' points outside the data folder"),
    ("absolute outside folder", lambda p: _json(p, [GOOD, {"image": "/etc/hostname", "caption": "x"}]), 2,
     "image path '/etc/hostname' points outside the data folder"),
    ("no placeholder", lambda p: _json(p, [GOOD, _chat("What is it?", "A cat.")]), 2,
     "no <image> placeholder for the row's image"),
    ("two placeholders", lambda p: _json(p, [GOOD, _chat("<image>\nWhat is it?", "A cat.", "<image> And now?", "B.")]),
     2, "2 <image> placeholders for 1 image"),
    ("placeholder twice in one message", lambda p: _json(p, [GOOD, _chat("<image><image> Hm?", "A cat.")]), 2,
     "2 <image> placeholders for 1 image"),
    ("placeholder in an answer", lambda p: _json(p, [GOOD, _chat("<image>\nWhat?", "See <image>.")]), 2,
     "answer 1 contains an <image> placeholder"),
    ("placeholder in a caption", lambda p: _csv_bad(p, [["a.png", "<image> a cat"]]), 2,
     "caption contains an <image> placeholder"),
    ("jsonl nested too deeply", lambda p: _raw(p / "d.jsonl", (json.dumps(GOOD) + "\n" + "[" * 100_000).encode()),
     2, "not valid JSON: nested too deeply"),
]


def _chat(*values):
    """A LLaVA row from alternating human and gpt messages."""
    return {"image": "a.png", "conversations": [
        {"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]}


def _raw(path, data: bytes):
    path.write_bytes(data)
    return path


def _json(tmp_path, items):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


@pytest.mark.parametrize("build,row,problem", [case[1:] for case in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_name_file_and_row_or_are_skipped_and_counted(tmp_path, build, row, problem):
    path = build(tmp_path)
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert message.startswith(f"{path}: row {row}: ")
    assert problem in message
    assert "\n" not in message
    samples, skipped = read_samples(path, on_bad_row="skip")
    assert len(skipped) == 1
    assert len(samples) == 1 and samples[0].turns == [("", "fine")]


@pytest.mark.parametrize("header,problem", [
    (["image", "text"], "missing column 'caption' (have: image, text)"),
    (["caption", "file"], "missing column 'image' or 'b64string_images' (have: caption, file)"),
])
def test_missing_column_names_the_file(tmp_path, header, problem):
    path = write_csv(tmp_path / "d.csv", header, [["a", "b"]])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: {problem}") + "$"):
        read_samples(path, on_bad_row="skip")


@pytest.mark.parametrize("content", [b"image,caption\n", b"", b"image,caption\n,\n"])
def test_no_usable_rows(tmp_path, content):
    path = _raw(tmp_path / "d.csv", content)
    with pytest.raises(DataError, match="no usable rows"):
        read_samples(path, on_bad_row="skip")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"d\.txt: unknown data format '\.txt'"):
        read_samples(_raw(tmp_path / "d.txt", b"x"))
    with pytest.raises(DataError, match=r"nope\.csv: cannot read data file"):
        read_samples(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"d\.json: not valid JSON: .* line 1"):
        read_samples(_raw(tmp_path / "d.json", b"[{"))
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list"):
        read_samples(_raw(tmp_path / "d.json", b'{"image": "a.png"}'))
    with pytest.raises(DataError, match=r"d\.json: not valid UTF-8 \(byte 21\)"):
        read_samples(_raw(tmp_path / "d.json", b'[{"image": "a.png", "\xff": 1}]'))
    with pytest.raises(DataError, match=r"d\.json: not valid JSON: nested too deeply"):
        read_samples(_raw(tmp_path / "d.json", b"[" * 100_000))


def test_absolute_paths_inside_the_data_folder_are_kept(tmp_path):
    inside = str(tmp_path / "imgs" / "a.png")
    samples, _ = read_samples(_json(tmp_path, [{"image": inside, "caption": "x"}]))
    assert samples[0].image == inside


def test_skipped_rows_are_counted_by_reason_with_the_first_of_each(tmp_path):
    lines = [json.dumps(GOOD), json.dumps({"image": "a.png", "caption": " "}), "{oops",
             json.dumps({"image": "b.png", "caption": ""}), json.dumps({"image": "../c.png", "caption": "x"}),
             json.dumps({"image": "d.png", "caption": "\t"}), '{"image": 1,', json.dumps({"caption": "x"})]
    path = _raw(tmp_path / "d.jsonl", "\n".join(lines).encode())
    samples, skipped = read_samples(path, on_bad_row="skip")
    assert len(samples) == 1 and len(skipped) == 7
    # The particulars of a problem (column, quoted path) do not make it another reason.
    assert str(skipped) == (
        f"7 bad rows: 3 empty caption (first: {path} row 2), "
        f"2 not valid JSON (first: {path} row 3: not valid JSON: Expecting property name enclosed in double "
        f"quotes at column 2), "
        f"1 image path ... points outside the data folder (first: {path} row 5: image path '../c.png' points "
        f"outside the data folder), "
        f"1 missing image (first: {path} row 8)")
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable rows (skipped 3 bad rows: 2 empty caption "
                                                  f"(first: {path} row 1), 1 missing image (first: {path} row 3))")):
        read_samples(_raw(tmp_path / "d.jsonl", b'{"image": "a.png", "caption": ""}\n{"image": "b.png", '
                          b'"caption": " "}\n{"caption": "x"}\n'), on_bad_row="skip")
