"""Readers for the data files accepted by ``--data``: CSV, JSONL and LLaVA-style JSON.

Every reader turns a file into ``Sample`` rows without decoding any image: decoding is
expensive and happens once, in the dataset. Bad rows either stop the run with a
``DataError`` naming the file and row, or are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from moevlm.data.images import ImageRef, looks_like_base64
from moevlm.errors import DataError

# The seed's base64 cells are far over the csv module's default 128 KiB field limit; the
# C long behind the limit is 32-bit on some platforms, hence the cap.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

IMAGE_PLACEHOLDER = "<image>"
_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
# Python's json parser recurses per nesting level; no data row needs more than a few.
_TOO_DEEP = "not valid JSON: nested too deeply"
# LLaVA's speakers and OpenAI's roles, as LLaVA's: what conversation_turns pairs.
_SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class Sample:
    # absolute path, base64 string, data: URL or stored image (not decoded yet); None: a
    # text-only conversation row, trained with no image tokens
    image: ImageRef | None
    # (prompt, answer); caption data gives [("", caption)]. A conversation's prompts keep
    # LLaVA's ``<image>`` placeholder (exactly one over a row with an image, none over a
    # text-only row): the tokenizer decides where
    # the image goes (a chat template places it there; the scratch model drops it).
    turns: list[tuple[str, str]]
    source: str  # the data file, for messages
    row: int  # 1-based: CSV record after the header, JSONL line, JSON list item
    # How messages name the row besides its number where the number alone does not find it:
    # an image folder's file ("'cats/003.png'"), a shard's key ("key '000017'").
    label: str | None = None

    @property
    def where(self) -> int | str:
        """The row as messages name it: its number, and its label when it has one."""
        return row_name(self.row, self.label)


def row_name(row: int | None, label: str | None) -> int | str | None:
    """``DataError``'s row: the number, with the label after it ("4 ('003.png')")."""
    return row if label is None or row is None else f"{row} ({label})"


class SkippedRows:
    """Rows skipped with ``on_bad_row=skip``, counted by reason, each reason with its first row.

    The reason is the problem without its particulars (what follows the first ": ", numbers,
    quoted names), so "text is 30 tokens, longer than ..." rows of any length count together.
    """

    _QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
    _NUMBER = re.compile(r"(?<![\w-])\d+(?![\w-])")  # not the 8 of UTF-8

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}  # reason -> "FILE row N" and the problem where it says more

    def add(self, source, row, problem: str) -> None:
        reason = self._NUMBER.sub("N", self._QUOTED.sub("...", problem).split(": ", 1)[0])
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, f"{source} row {row}" + ("" if problem == reason else f": {problem}"))

    def update(self, other: SkippedRows) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            self.first.setdefault(reason, other.first[reason])

    def __len__(self) -> int:
        return sum(self.counts.values())

    def reasons(self) -> str:
        """E.g. ``2 cannot decode image (first: d.csv row 4: cannot decode image: image file is
        truncated), 1 empty caption (first: d.csv row 9)``, the most common reason first."""
        reasons = sorted(self.counts, key=lambda reason: -self.counts[reason])
        return ", ".join(f"{self.counts[r]} {r} (first: {self.first[r]})" for r in reasons)

    def __str__(self) -> str:
        """E.g. ``3 bad rows: `` and the ``reasons``."""
        return f"{len(self)} bad row{'s' if len(self) != 1 else ''}: {self.reasons()}"


class BadRow(Exception):
    """A row that cannot be used; ``collect_samples`` decides whether to stop or skip."""


Turns = list[tuple[str, str]]


def clean_prompt(text: str) -> str:
    """Drop LLaVA's ``<image>`` placeholder, for tokenizers that do not place the image in the text."""
    return _IMAGE_PLACEHOLDER.sub(" ", text).strip()


def read_samples(path: str | Path, on_bad_row: str = "error",
                 max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    """Read a data file into samples; returns ``(samples, skipped)``.

    ``max_rows`` caps the number of samples kept (bad rows skipped on the way don't count).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be error or skip, not {on_bad_row!r}")
    path = Path(path)
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(path, None, f"unknown data format {path.suffix or '(no extension)'!r} "
                                    "(use .csv, .jsonl or .json)")
    folder = os.path.abspath(path.parent)
    rows = ((row, partial(parse, folder), None) for row, parse in reader(path))
    return collect_samples(path, rows, on_bad_row, max_rows)


def collect_samples(source: str | Path,
                    rows: Iterable[tuple[int, Callable[[], tuple[ImageRef | None, Turns]], str | None]],
                    on_bad_row: str, max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    """The samples of ``rows`` (row number, parse: () -> (image, turns) or raises ``BadRow``,
    the row's ``Sample.label`` or None), each bad row stopping the run or counted as skipped;
    every reader ends here."""
    samples: list[Sample] = []
    skipped = SkippedRows()
    try:
        for row, parse, label in rows:
            if max_rows is not None and len(samples) >= max_rows:
                break
            try:
                image, turns = parse()
            except BadRow as bad:
                if on_bad_row == "error":
                    raise DataError(source, row_name(row, label), str(bad)) from None
                skipped.add(source, row_name(row, label), str(bad))
                continue
            samples.append(Sample(image=image, turns=turns, source=str(source), row=row, label=label))
    except OSError as err:
        raise DataError(source, None, f"cannot read data file: {err.strerror or err}") from None
    if not samples:
        problem = "no usable rows" + (f" (skipped {skipped})" if skipped else "")
        raise DataError(source, None, problem)
    return samples, skipped


# Each reader yields (row, parse): parse(folder) -> (image, turns) or raises BadRow, so
# the row-level decision to stop or skip lives in one place.
RowParser = Callable[[str], tuple[str, list[tuple[str, str]]]]


def _csv_rows(path: Path) -> Iterator[tuple[int, RowParser]]:
    # surrogateescape keeps reading past bytes that are not UTF-8, so the bad row can be
    # named (and skipped) instead of failing the whole file at an unknown position.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader, [])]
            if not header:
                return  # an empty file: reported as having no usable rows
            image_column = next((c for c in ("image", "b64string_images") if c in header), None)
            have = ", ".join(header) or "none"
            if image_column is None:
                raise DataError(path, None, f"missing column 'image' or 'b64string_images' (have: {have})")
            if "caption" not in header:
                raise DataError(path, None, f"missing column 'caption' (have: {have})")
            image_at, caption_at = header.index(image_column), header.index("caption")
            is_b64 = image_column == "b64string_images"
            for row, cells in enumerate(reader, start=1):
                if not cells:
                    continue  # an empty line (often the last one) holds no row
                image = cells[image_at] if image_at < len(cells) else None
                caption = cells[caption_at] if caption_at < len(cells) else None
                yield row, partial(_csv_row, image, caption, is_b64)
        except csv.Error as err:
            raise DataError(path, reader.line_num - 1, f"malformed CSV: {err}") from None


def _csv_row(image: str | None, caption: str | None, is_b64: bool,
             folder: str) -> tuple[str, list[tuple[str, str]]]:
    for text in (image, caption):
        if text is not None and _has_bad_bytes(text):
            raise BadRow("text is not valid UTF-8")
    if is_b64:
        if not image or not image.strip():
            raise BadRow("missing image")
        # As a data: URL the cell is always decoded as base64, never opened as a file name.
        return "data:;base64," + "".join(image.split()), [("", answer_text(caption, "caption"))]
    return image_ref(image, folder), [("", answer_text(caption, "caption"))]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, RowParser]]:
    with open(path, "rb") as f:
        for row, raw in enumerate(f, start=1):
            if raw.strip():
                yield row, partial(_jsonl_row, raw)


def _jsonl_row(raw: bytes, folder: str) -> tuple[str, list[tuple[str, str]]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRow("text is not valid UTF-8") from None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRow(f"not valid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise BadRow(_TOO_DEEP) from None
    return _object(item, folder)


def _json_rows(path: Path) -> Iterator[tuple[int, RowParser]]:
    raw = path.read_bytes()
    try:
        items = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, None, f"not valid JSON: {err.msg} at line {err.lineno} "
                                    f"column {err.colno}") from None
    except RecursionError:
        raise DataError(path, None, _TOO_DEEP) from None
    if not isinstance(items, list):
        raise DataError(path, None, "expected a JSON list of objects")
    for row, item in enumerate(items, start=1):
        yield row, partial(_object, item)


def _object(item: Any, folder: str) -> tuple[str, list[tuple[str, str]]]:
    """One JSON object: ``image`` plus ``conversations`` (LLaVA's ``from``/``value`` messages, or any
    shape ``sharegpt_messages`` reads: ``user``/``assistant``/``system`` roles too) or ``caption``."""
    if not isinstance(item, dict):
        raise BadRow(f"expected a JSON object, got {type(item).__name__}")
    image = item.get("image")
    if image is not None and not isinstance(image, str):
        raise BadRow("image is not a string")
    if "conversations" in item:
        turns = conversation_turns(item["conversations"], with_image=image is not None)
        if image is None:  # a text-only conversation (LLaVA-665k has tens of thousands)
            return None, turns
    else:
        turns = [("", answer_text(item.get("caption"), "caption"))]
    return image_ref(image, folder), turns


def sharegpt_messages(messages: Any) -> list[dict]:
    """from/value, role/content or user/assistant messages -> LLaVA's from (human/gpt) / value;
    system text goes before the first user message, an image part of a content list becomes
    ``<image>``."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("conversations must be a non-empty list")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise BadRow(f"conversation message {number} is not an object")
    if all(m.get("user") is not None for m in messages):
        messages = [{"from": speaker, "value": m.get(key)} for m in messages
                    for speaker, key in (("human", "user"), ("gpt", "assistant"))]
    out, system = [], []
    for message in messages:
        speaker = message.get("from") if message.get("from") is not None else message.get("role")
        value = message.get("value") if message.get("value") is not None else message.get("content")
        if isinstance(value, list):  # OpenAI content parts
            value = "".join(IMAGE_PLACEHOLDER if isinstance(p, dict) and p.get("type") == "image"
                            else str(p.get("text") or "") if isinstance(p, dict) else str(p) for p in value)
        if speaker == "system":
            system.append(str(value))
            continue
        out.append({"from": _SPEAKERS.get(speaker, speaker), "value": value})
    if not out:
        raise BadRow("conversation has no user or assistant message")
    if system and isinstance(out[0]["value"], str):
        out[0]["value"] = "\n".join(system + [out[0]["value"]])
    return out


def conversation_turns(messages: Any, with_image: bool = True) -> list[tuple[str, str]]:
    """Pair each human message with the gpt message that follows it; ``messages`` in any shape
    ``sharegpt_messages`` reads."""
    messages = sharegpt_messages(messages)
    if len(messages) % 2:
        raise BadRow(f"conversation has {len(messages)} messages; expected human/gpt pairs")
    turns = []
    for i in range(0, len(messages), 2):
        pair = messages[i:i + 2]
        speakers = [m.get("from") for m in pair]
        if speakers != ["human", "gpt"]:
            raise BadRow(f"conversation not alternating human/gpt at message {i + 1} "
                          f"(got {speakers[0]!r}, {speakers[1]!r})")
        prompt = pair[0].get("value")
        if not isinstance(prompt, str):
            raise BadRow(f"conversation message {i + 1} has no text value")
        turns.append((prompt, answer_text(pair[1].get("value"), f"answer {i // 2 + 1}")))
    # One image per row, so exactly one placeholder says where it goes (LLaVA data always
    # has it); a chat template could not place zero or two of them sensibly.
    count = sum(prompt.count(IMAGE_PLACEHOLDER) for prompt, _ in turns)
    if not with_image:
        if count:
            raise BadRow(f"{IMAGE_PLACEHOLDER} placeholder but the row has no image")
        return turns
    if count == 0:
        raise BadRow(f"no {IMAGE_PLACEHOLDER} placeholder for the row's image")
    if count > 1:
        raise BadRow(f"{count} {IMAGE_PLACEHOLDER} placeholders for 1 image")
    return turns


def answer_text(text: Any, what: str) -> str:
    if text is None:
        raise BadRow(f"missing {what}")
    if not isinstance(text, str):
        raise BadRow(f"{what} is not text")
    if not text.strip():
        raise BadRow(f"empty {what}")
    if IMAGE_PLACEHOLDER in text:  # the image is input, never something to write
        raise BadRow(f"{what} contains an {IMAGE_PLACEHOLDER} placeholder")
    return text.strip()


def image_ref(image: str | None, folder: str) -> str:
    """A data: URL or base64 string as is; a path made absolute, which must lie in the data folder."""
    if image is None or not image.strip():
        raise BadRow("missing image")
    image = image.strip()
    if image.startswith("data:"):
        return image
    candidate = os.path.join(folder, image)  # an absolute image path replaces the folder
    if looks_like_base64(image) and not os.path.isfile(candidate):
        return "".join(image.split())
    # Judged on the written path, not on symlink targets: linking a dataset in is normal,
    # writing "../" or "/etc/..." to reach files beside the data folder is what is refused.
    # The folder's own real path counts too, for absolute paths written through it.
    resolved = os.path.normpath(candidate)
    if not any(inside(resolved, root) for root in (folder, os.path.realpath(folder))):
        raise BadRow(f"image path {image!r} points outside the data folder")
    return resolved


def inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _has_bad_bytes(text: str) -> bool:
    # Bytes that were not UTF-8 come back from surrogateescape as lone surrogates.
    return any("\udc80" <= ch <= "\udcff" for ch in text)
