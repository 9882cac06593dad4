"""Property-based tests of the data readers and image decoding: generated files either read as
exactly the rows they hold, or fail with a DataError (ValueError for images), never anything else."""

import base64
import csv
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moevlm.data.images import open_image
from moevlm.data.records import read_samples
from moevlm.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT = st.text(max_size=20)  # any code point but lone surrogates, which no file can hold
GOOD_IMAGES = st.builds(lambda pad, name: f"{pad}{name}{pad}", st.sampled_from(["", " ", "\t"]),
                        st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_]{1,8})?\.png", fullmatch=True))
BAD_IMAGES = st.sampled_from(["", "   ", "../x.png", "a/../../x.png", "/etc/passwd"])
IMAGES = st.one_of(GOOD_IMAGES, BAD_IMAGES)


def is_good(image: str, answers: list[str]) -> bool:
    return image.strip() not in ("", "../x.png", "a/../../x.png", "/etc/passwd") and all(a.strip() for a in answers)


def read(folder: str, name: str, data: bytes, on_bad_row: str = "skip"):
    path = Path(folder) / name
    path.write_bytes(data)
    return path, read_samples(path, on_bad_row=on_bad_row)


def check_rows(folder, name, data, rows, expected_turns):
    """``rows``: (image, answers) per row; the good ones must come back in order with these turns."""
    good = [(row, image, turns) for row, ((image, answers), turns) in enumerate(zip(rows, expected_turns), start=1)
            if is_good(image, answers)]
    if not good:
        with pytest.raises(DataError, match="no usable rows"):
            read(folder, name, data)
        return
    path, (samples, skipped) = read(folder, name, data)
    assert [(s.row, s.image, s.turns) for s in samples] == [
        (row, os.path.join(folder, image.strip()), turns) for row, image, turns in good]
    assert len(skipped) == len(rows) - len(good)
    bad_rows = sorted(set(range(1, len(rows) + 1)) - {row for row, _, _ in good})
    if bad_rows:  # stopping instead of skipping: at the first bad row
        with pytest.raises(DataError, match=f"^{path}: row {bad_rows[0]}: "):
            read_samples(path, on_bad_row="error")


@SETTINGS
@given(rows=st.lists(st.tuples(IMAGES, TEXT), max_size=6))
def test_csv_rows_read_as_written(rows):
    with tempfile.TemporaryDirectory() as folder:
        with open(Path(folder) / "write.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
        data = (Path(folder) / "write.csv").read_bytes()
        check_rows(folder, "d.csv", data, [(image, [caption]) for image, caption in rows],
                   [[("", caption.strip())] for _, caption in rows])


@SETTINGS
@given(rows=st.lists(st.tuples(IMAGES, TEXT, st.booleans()), max_size=6))
def test_jsonl_caption_rows_read_as_written(rows):
    lines = [json.dumps({"image": image, "caption": caption, "id": i}, ensure_ascii=ascii)
             for i, (image, caption, ascii) in enumerate(rows)]
    with tempfile.TemporaryDirectory() as folder:
        check_rows(folder, "d.jsonl", "\n".join(lines).encode(), [(image, [caption]) for image, caption, _ in rows],
                   [[("", caption.strip())] for _, caption, _ in rows])


@st.composite
def conversation_turns(draw):
    """1-3 (prompt, answer) turns with LLaVA's one <image> placeholder in one of the prompts."""
    turns = draw(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))
    at = draw(st.integers(0, len(turns) - 1))
    tag = draw(st.sampled_from(["<image>\n", "<image>", "\n<image>"]))
    prompt = turns[at][0]
    turns[at] = (tag + prompt if draw(st.booleans()) else prompt + tag, turns[at][1])
    return turns


TURNS = conversation_turns()


@SETTINGS
@given(rows=st.lists(st.tuples(IMAGES, TURNS), max_size=5))
def test_llava_json_conversations_read_as_written(rows):
    items = [{"image": image, "conversations": [message for prompt, answer in turns for message in (
        {"from": "human", "value": prompt}, {"from": "gpt", "value": answer})]} for image, turns in rows]
    with tempfile.TemporaryDirectory() as folder:
        check_rows(folder, "d.json", json.dumps(items).encode(),
                   [(image, [answer for _, answer in turns]) for image, turns in rows],
                   [[(prompt, answer.strip()) for prompt, answer in turns] for _, turns in rows])


HEADERS = st.sampled_from([b"", b"image,caption\n", b"b64string_images,caption\n", b"\xef\xbb\xbfimage,caption\r\n",
                           b'{"image": "a.png", "caption": ', b'[{"image": "a.png", "conversations": [', b"[", b"\n"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["image", "caption", "conversations", "from", "value"]) | TEXT, inner, max_size=4),
    max_leaves=12)


def assert_samples_or_data_error(path: Path, on_bad_row: str) -> None:
    try:
        samples, _ = read_samples(path, on_bad_row=on_bad_row)
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        return
    for sample in samples:
        assert sample.image and sample.turns and all(isinstance(p, str) and a.strip() for p, a in sample.turns)


@SETTINGS
@given(head=HEADERS, body=st.binary(max_size=200) | TEXT.map(str.encode),
       suffix=st.sampled_from([".csv", ".jsonl", ".json"]), on_bad_row=st.sampled_from(["error", "skip"]))
def test_any_bytes_read_as_samples_or_a_data_error(head, body, suffix, on_bad_row):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_bytes(head + body)
        assert_samples_or_data_error(path, on_bad_row)


@SETTINGS
@given(values=st.lists(JSON_VALUES, max_size=4), suffix=st.sampled_from([".jsonl", ".json"]),
       on_bad_row=st.sampled_from(["error", "skip"]))
def test_any_json_reads_as_samples_or_a_data_error(values, suffix, on_bad_row):
    text = json.dumps(values) if suffix == ".json" else "\n".join(json.dumps(v) for v in values)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_text(text, encoding="utf-8")
        assert_samples_or_data_error(path, on_bad_row)


SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP", b""]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's note on the way to decoding or failing
@SETTINGS
@given(head=st.sampled_from(SIGNATURES), body=st.binary(max_size=300))
def test_any_image_bytes_decode_or_raise_value_error(head, body):
    ref = "data:image/x;base64," + base64.b64encode(head + body).decode()
    try:
        image = open_image(ref)
    except ValueError as err:
        assert str(err).startswith("cannot decode image: ") and "\n" not in str(err)
        return
    assert image.mode == "RGB"
