"""COCO captions: one annotations JSON (``images`` with ``id``/``file_name``, ``annotations`` with
``image_id``/``caption``), e.g. ``annotations/captions_train2017.json``.

Every caption is a row (row N is the file's Nth annotation), so an image's five captions are
five rows of one picture: the image-level split keeps them together and ``eval`` scores a
caption against all of them. File names resolve under ``data.image_root``; without it, under the
conventional image folder named after the file (``captions_train2017.json`` -> ``train2017/``,
beside the file or beside its ``annotations/`` folder) when there is one, else beside the file.
A name that leads outside that folder (``../``, an absolute path) is a bad row, found before any
image is read.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from moevlm.data.records import BadRow, Sample, SkippedRows, answer_text, collect_samples, inside
from moevlm.errors import DataError

_TOO_DEEP = "not valid JSON: nested too deeply"


def is_coco_file(path: Path) -> bool:
    """A ``.json`` file holding one object (row data is a list): read as COCO annotations."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        start = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return start.startswith(b"{")


def image_root(path: Path, configured: str | None) -> str:
    """The folder COCO file names are resolved under (see the module docstring)."""
    if configured is not None:
        return os.path.abspath(configured)
    folder = path.resolve().parent
    split = path.stem.rsplit("_", 1)[-1]  # captions_train2017 -> train2017
    for candidate in (folder / split, folder.parent / split):
        if split and candidate.is_dir():
            return str(candidate)
    return str(folder)


def read_coco(path: str | Path, on_bad_row: str = "error", max_rows: int | None = None,
              root: str | None = None) -> tuple[list[Sample], SkippedRows]:
    """COCO captions -> one sample per caption, images not read; ``root``: ``data.image_root``."""
    path = Path(path)
    data = _load(path)
    folder = image_root(path, root)
    if not os.path.isdir(folder):
        raise DataError(path, None, f"image folder {folder} does not exist (set data.image_root)")
    files = _image_files(path, data["images"], folder)
    rows = ((row, partial(_caption_row, item, files), None) for row, item in enumerate(data["annotations"], start=1))
    return collect_samples(path, rows, on_bad_row, max_rows)


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise DataError(path, None, f"cannot read data file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, None, f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise DataError(path, None, _TOO_DEEP) from None
    missing = [key for key in ("images", "annotations") if key not in data]
    if missing:
        raise DataError(path, None, f"a JSON object must be COCO annotations, but has no {' or '.join(missing)!r} "
                                    "key (row data is a JSON list of objects)")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise DataError(path, None, f"COCO {key!r} must be a list, not {type(data[key]).__name__}")
    return data


def _image_files(path: Path, images: list, folder: str) -> dict[Any, str | BadRow]:
    """image id -> absolute file path, or the problem its captions' rows have."""
    files: dict[Any, str | BadRow] = {}
    names: dict[Any, Any] = {}  # image id -> its file_name, to name both entries of a repeated id
    for number, entry in enumerate(images, start=1):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataError(path, None, f"COCO image entry {number} is not an object with an 'id'")
        image_id, name = entry["id"], entry.get("file_name")
        if isinstance(image_id, (dict, list)):
            raise DataError(path, None, f"COCO image entry {number}: id must be a number or string")
        if image_id in names:
            # Which of the two pictures the captions describe cannot be known: neither may win.
            raise DataError(path, None, f"COCO image id {image_id!r} appears twice in 'images' (file_name "
                                        f"{names[image_id]!r} and {name!r})")
        names[image_id] = name
        files[image_id] = _resolve(name, folder)
    return files


def _resolve(name: Any, folder: str) -> str | BadRow:
    if not isinstance(name, str) or not name.strip():
        return BadRow("image entry has no file_name")
    # Judged on the written name, as for row data: "../" or an absolute path leaving the folder is refused.
    resolved = os.path.normpath(os.path.join(folder, name.strip()))
    if not any(inside(resolved, root) for root in (folder, os.path.realpath(folder))):
        return BadRow(f"image file name {name!r} points outside the image folder {folder}")
    return resolved


def _caption_row(item: Any, files: dict[Any, str | BadRow]) -> tuple[str, list[tuple[str, str]]]:
    if not isinstance(item, dict):
        raise BadRow(f"annotation is not an object, got {type(item).__name__}")
    image_id = item.get("image_id")
    if isinstance(image_id, (dict, list)) or image_id not in files:
        raise BadRow(f"image_id {image_id!r} has no entry in 'images'")
    image = files[image_id]
    if isinstance(image, BadRow):
        raise image
    return image, [("", answer_text(item.get("caption"), "caption"))]
