"""Hugging Face ``datasets`` data: ``hf:NAME[:split]`` (``datasets.load_dataset``, offline from the
local cache with ``HF_DATASETS_OFFLINE=1``), a ``save_to_disk`` folder, ``.arrow`` and ``.parquet`` files.

The image column (``data.image_column``, else ``image`` or ``images``) holds an ``Image`` feature
(``{bytes, path}``), bytes, or a path string; the text column (``data.text_column``, else
``conversations``, ``messages``, ``caption`` or ``text``) a caption string or a conversation in
ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) shape. The schema is checked before
any row is read; text is read up front, images stay in the file (``data/arrow_images.py``) until
the dataset decodes them. A conversation row without an image is a text-only row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from moevlm.data.arrow_images import ArrowImage, ParquetImage, arrow_table
from moevlm.data.records import (
    IMAGE_PLACEHOLDER,
    BadRow,
    Sample,
    SkippedRows,
    answer_text,
    collect_samples,
    conversation_turns,
    image_ref,
)
from moevlm.errors import DataError

IMAGE_COLUMNS = ("image", "images")
TEXT_COLUMNS = ("conversations", "messages", "texts", "caption", "text")
# The message shapes a conversation column may have: ShareGPT, OpenAI, and The Cauldron's
# (nanoVLM's data: one {user, assistant} pair per turn).
_MESSAGE_FIELDS = (("from", "value"), ("role", "content"), ("user", "assistant"))
_SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


@dataclass(frozen=True)
class _Part:
    """One file of a data set."""

    path: str
    parquet: bool

    def schema(self):
        if self.parquet:
            # Lazy: pyarrow takes a while to import and only these formats need it.
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).schema_arrow
        return arrow_table(self.path).schema

    def chunks(self, text_column: str, image_column: str | None, stored: bool, folder: str) -> Iterator[tuple]:
        """Per chunk (a whole Arrow file, a Parquet row group): its texts, then per row the image
        cell (a path string) or a stored image, or None for a row without one. Image bytes are
        not kept: Arrow cells stay memory-mapped, a Parquet group is read and let go."""
        if not self.parquet:
            yield self._chunk(arrow_table(self.path), text_column, image_column, stored,
                              partial(ArrowImage, self.path, column=image_column, folder=folder))
            return
        # Lazy: pyarrow takes a while to import and only these formats need it.
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        columns = [text_column] + ([image_column] if image_column else [])
        for group in range(file.metadata.num_row_groups):
            yield self._chunk(file.read_row_group(group, columns=columns), text_column, image_column, stored,
                              partial(ParquetImage, self.path, group, column=image_column, folder=folder))

    @staticmethod
    def _chunk(table, text_column: str, image_column: str | None, stored: bool, make: Callable) -> tuple:
        texts = table.column(text_column).to_pylist()
        if image_column is None:
            return texts, [None] * len(texts)
        if not stored:
            return texts, table.column(image_column).to_pylist()
        return texts, [make(row=row) if count == 1 else None if count == 0 else _Images(count)
                       for row, count in enumerate(_image_counts(table.column(image_column)))]


@dataclass(frozen=True)
class _Images:
    """A cell with more than one image: a bad row."""

    count: int


def _image_counts(column) -> list[int]:
    """Images per cell (0 for null or an empty list), without converting the bytes."""
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.fill_null(pc.list_value_length(column), 0).to_pylist()
    return [int(valid) for valid in pc.is_valid(column).to_pylist()]


def read_hf(spec: str | Path, data, max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    """A Hugging Face data set (``hf:NAME[:split]``, a ``save_to_disk`` folder, ``.arrow`` or
    ``.parquet``) -> samples; ``data``: the ``DataConfig`` (columns, image_root, on_bad_row)."""
    source = str(spec)
    parts, folder = _parts(source)
    schema = _schema(parts[0])
    image_column, text_column = _choose_columns(source, schema, data)
    image_kind = _image_kind(source, schema, image_column) if image_column else None
    text_kind = _text_kind(source, schema, text_column)
    folder = os.path.abspath(data.image_root) if data.image_root else folder
    for part in parts[1:]:
        if _schema(part).names != schema.names:
            raise DataError(part.path, None, f"columns differ from {parts[0].path}'s")
    if parts[0].parquet and not data.preload:
        parts = _arrow_copy(parts[0])
    rows = _rows(parts, image_column, image_kind, text_column, text_kind, folder)
    return collect_samples(source, rows, data.on_bad_row, max_rows)


def _schema(part: _Part):
    try:
        return part.schema()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(part.path, None, f"not a readable {'Parquet' if part.parquet else 'Arrow'} file: {reason}") \
            from None


def _arrow_copy(part: _Part) -> list[_Part]:
    """A Parquet file as Arrow files, for streaming: reading one image of a Parquet file reads its
    whole row group (``datasets`` writes groups of up to 100 MB), so shuffled reads would read the
    file over and over. ``datasets`` converts it once into its cache (as ``load_dataset`` does, and
    again only when the file changes); the Arrow files are then memory-mapped."""
    # Lazy: datasets takes seconds to import and only these formats need it.
    import datasets

    try:
        dataset = datasets.Dataset.from_parquet(part.path)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(part.path, None, f"cannot convert to Arrow for streaming: {reason}") from None
    return _dataset_parts(part.path, dataset)


def _parts(source: str) -> tuple[list[_Part], str]:
    """The files of a data set, and the folder relative image paths start from."""
    if source.startswith("hf:"):
        return _hub_parts(source)
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, "no such file or folder")
    if path.is_dir():
        return _saved_parts(path), str(path.resolve())
    return [_Part(str(path.resolve()), path.suffix.lower() == ".parquet")], str(path.resolve().parent)


def _hub_parts(source: str) -> tuple[list[_Part], str]:
    name, _, split = source[len("hf:"):].partition(":")
    # Lazy: datasets takes seconds to import and only hf: data needs it.
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (hub, network, cache, split)
        offline = " (HF_DATASETS_OFFLINE=1: only data sets in the local cache)" \
            if os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true", "TRUE") else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(source, None, f"cannot load the data set{offline}: {reason}") from None
    return _dataset_parts(source, dataset), os.getcwd()


def _saved_parts(path: Path) -> list[_Part]:
    if not is_saved_dataset(path):
        raise DataError(path, None, "not a folder written by datasets' save_to_disk")
    # Lazy: datasets takes seconds to import and only these formats need it.
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged folder fails in many ways
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(path, None, f"cannot load the saved data set: {reason}") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" not in splits and len(splits) != 1:
            raise DataError(path, None, f"splits {', '.join(splits)}: save the one to use on its own")
        dataset = dataset["train" if "train" in splits else splits[0]]
    return _dataset_parts(str(path), dataset)


def _dataset_parts(source: str, dataset) -> list[_Part]:
    if dataset._indices is not None or not dataset.cache_files:
        # A filtered or in-memory view has no files to address rows in; save_to_disk writes them.
        raise DataError(source, None, "the data set is not backed by Arrow files in order (save_to_disk it first)")
    return [_Part(entry["filename"], False) for entry in dataset.cache_files]


def _choose_columns(source: str, schema, data) -> tuple[str | None, str]:
    names = schema.names
    have = ", ".join(names) or "none"
    for key, given in (("data.image_column", data.image_column), ("data.text_column", data.text_column)):
        if given is not None and given not in names:
            raise DataError(source, None, f"no column {given!r} ({key}; have: {have})")
    image = data.image_column or next((name for name in IMAGE_COLUMNS if name in names), None)
    text = data.text_column or next((name for name in TEXT_COLUMNS if name in names), None)
    if text is None:
        raise DataError(source, None, f"no text column (looked for {', '.join(TEXT_COLUMNS)}; have: {have}; "
                                      "set data.text_column)")
    if image is None and _text_kind(source, schema, text) == "caption":
        raise DataError(source, None, f"no image column (looked for {', '.join(IMAGE_COLUMNS)}; have: {have}; "
                                      "set data.image_column)")
    return image, text


def _image_kind(source: str, schema, name: str) -> str:
    """"stored" (bytes, an Image feature, or a list of them) or "ref" (a path / base64 string)."""
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow as pa

    kind = schema.field(name).type
    cell = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
    if pa.types.is_struct(cell) and cell.get_field_index("bytes") >= 0 and _is_binary(cell.field("bytes").type):
        return "stored"
    if _is_binary(cell):
        return "stored"
    if cell == kind and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return "ref"
    raise DataError(source, None, f"column {name!r} is {kind}; expected images (an Image feature, bytes or paths)")


def _is_binary(kind) -> bool:
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _text_kind(source: str, schema, name: str) -> str:
    """"caption" (a string) or "conversation" (a list of from/value or role/content messages)."""
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow as pa

    kind = schema.field(name).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "caption"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        message = kind.value_type
        if pa.types.is_struct(message) and any(
                message.get_field_index(a) >= 0 and message.get_field_index(b) >= 0
                for a, b in _MESSAGE_FIELDS):
            return "conversation"
    raise DataError(source, None, f"column {name!r} is {kind}; expected text or a list of messages "
                                  "(from/value, role/content or user/assistant)")


def _rows(parts: list[_Part], image_column: str | None, image_kind: str | None, text_column: str,
          text_kind: str, folder: str) -> Iterator[tuple[int, Callable]]:
    row = 0
    for part in parts:
        for texts, images in part.chunks(text_column, image_column, image_kind == "stored", folder):
            for text, image in zip(texts, images):
                row += 1
                yield row, partial(_parse, image, text, text_kind, folder)


def _parse(image: Any, text: Any, text_kind: str, folder: str) -> tuple[Any, list[tuple[str, str]]]:
    if isinstance(image, _Images):
        raise BadRow(f"{image.count} images in the row; one image per row is supported")
    if isinstance(image, str):
        image = image_ref(image, folder)
    if text_kind == "caption":
        if image is None:
            raise BadRow("missing image")
        return image, [("", answer_text(text, "caption"))]
    messages = _sharegpt(text)
    if image is not None and not any(IMAGE_PLACEHOLDER in str(m.get("value")) for m in messages):
        # As LLaVA writes it: the image first in the first user message.
        messages[0] = {**messages[0], "value": f"{IMAGE_PLACEHOLDER}\n{messages[0].get('value')}"}
    return image, conversation_turns(messages, with_image=image is not None)


def _sharegpt(messages: Any) -> list[dict]:
    """from/value, role/content or user/assistant messages -> LLaVA's from (human/gpt) / value;
    system text goes before the first user message, an image part of a content list becomes
    ``<image>``."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("conversation must be a non-empty list")
    if all(isinstance(m, dict) and m.get("user") is not None for m in messages):
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
