"""A folder of images, each with a sidecar caption file of the same name (``cat.jpg`` +
``cat.txt``), the layout many captioning and diffusion data sets use.

Subfolders are read too (symlinked subfolders are not followed), in sorted order; row N is
the Nth image, and messages name its file too (``pictures: row 4 ('003.png'): ...``). An image
without its caption file, with an empty one, or an image or caption file that is a symlink
pointing outside the folder is a bad row, found before any image is read. Other files are
ignored. A folder with a ``metadata.jsonl`` is a Hugging Face ImageFolder (``hf_datasets.py``).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from moevlm.data.records import BadRow, Sample, SkippedRows, answer_text, collect_samples, inside
from moevlm.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"


def read_image_folder(folder: str | Path, on_bad_row: str = "error",
                      max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    folder = Path(folder)
    root = os.path.realpath(folder)
    images = sorted(_image_files(root))
    if not images:
        raise DataError(folder, None, f"no image files ({', '.join(IMAGE_SUFFIXES)}) and not a data set folder")
    # Each row is also named by its file: a row number alone does not find it in a folder.
    rows = ((row, partial(_row, path, root), repr(os.path.relpath(path, root)))
            for row, path in enumerate(images, start=1))
    return collect_samples(folder, rows, on_bad_row, max_rows)


def _image_files(root: str) -> list[str]:
    found = []
    for here, _, names in os.walk(root):
        found += [os.path.join(here, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _row(image: str, root: str) -> tuple[str, list[tuple[str, str]]]:
    caption_file = os.path.splitext(image)[0] + CAPTION_SUFFIX
    for path in (image, caption_file):
        if os.path.islink(path) and not inside(os.path.realpath(path), root):
            raise BadRow(f"symlink {os.path.relpath(path, root)!r} points outside the folder")
    try:
        with open(caption_file, encoding="utf-8") as f:
            caption = f.read()
    except FileNotFoundError:
        raise BadRow(f"no caption file {os.path.relpath(caption_file, root)!r}") from None
    except UnicodeDecodeError:
        raise BadRow(f"caption file {os.path.relpath(caption_file, root)!r} is not valid UTF-8") from None
    return image, [("", answer_text(caption, "caption"))]
