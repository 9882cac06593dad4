"""Hugging Face ``datasets`` data: ``hf:NAME[:split]`` (``datasets.load_dataset``, offline from the
local cache with ``HF_DATASETS_OFFLINE=1``), a ``save_to_disk`` folder, an ImageFolder (images and a
``metadata.jsonl``, read by ``load_dataset`` as ``hf:FOLDER`` is), ``.arrow`` and ``.parquet`` files.
Of a data set with several splits, ``data.split`` (or ``hf:NAME:SPLIT``) chooses one, else ``train``
is read and the others are named on stderr.

The image column (``data.image_column``, else ``image`` or ``images``) holds an ``Image`` feature
(``{bytes, path}``), bytes, or a path string; the text column (``data.text_column``, else
``conversations``, ``messages``, ``caption`` or ``text``) a caption string or a conversation in
ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) shape. The schema is checked before
any row is read; text is read up front, images stay in the file (``data/arrow_images.py``) until
the dataset decodes them. A conversation row without an image is a text-only row.
"""

from __future__ import annotations

import logging
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
    sharegpt_messages,
)
from moevlm.errors import DataError
from moevlm.extras import require

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "images")
TEXT_COLUMNS = ("conversations", "messages", "texts", "caption", "text")
# The message shapes a conversation column may have: ShareGPT, OpenAI, and The Cauldron's
# (nanoVLM's data: one {user, assistant} pair per turn).
_METADATA_SUFFIXES = (".jsonl", ".csv", ".parquet")
_MESSAGE_FIELDS = (("from", "value"), ("role", "content"), ("user", "assistant"))


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def is_image_folder_dataset(path: Path) -> bool:
    """A Hugging Face ImageFolder: images with a ``metadata.jsonl`` (``.csv``, ``.parquet``) holding
    their captions, in the folder or in its split folders (``train/``, ``test/``)."""
    if not path.is_dir():
        return False
    folders = [path] + [child for child in path.iterdir() if child.is_dir()]
    return any((folder / f"metadata{suffix}").is_file() for folder in folders for suffix in _METADATA_SUFFIXES)


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
    require("pyarrow", f"Hugging Face data ({source})")
    parts, folder = _parts(source, data.split)
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


def _parts(source: str, split: str | None) -> tuple[list[_Part], str]:
    """The files of a data set, and the folder relative image paths start from."""
    if source.startswith("hf:"):
        name, _, named = source[len("hf:"):].partition(":")
        if named and split and named != split:
            raise DataError(source, None, f"names split {named!r} but data.split is {split!r}")
        return _loaded_parts(source, name, named or split), os.getcwd()
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, "no such file or folder")
    if is_image_folder_dataset(path):
        return _loaded_parts(source, str(path), split), str(path.resolve())
    if path.is_dir():
        return _saved_parts(path, split), str(path.resolve())
    return [_Part(str(path.resolve()), path.suffix.lower() == ".parquet")], str(path.resolve().parent)


def choose_split(source: str, splits: list[str], asked: str | None) -> str:
    """``asked`` (data.split or ``hf:NAME:SPLIT``), else ``train``, else the only split; the
    splits left unread are said on stderr, never ignored without a word."""
    if asked is not None:
        if asked not in splits:
            raise DataError(source, None, f"no split {asked!r} (have: {', '.join(splits)})")
        return asked
    if "train" not in splits and len(splits) != 1:
        raise DataError(source, None, f"splits {', '.join(splits)}: choose one with data.split")
    chosen = "train" if "train" in splits else splits[0]
    others = [name for name in splits if name != chosen]
    if others:
        log.warning("%s: reading split %r, not %s (data.split chooses another)", source, chosen,
                    ", ".join(map(repr, others)))
    return chosen


def _loaded_parts(source: str, name: str, split: str | None) -> list[_Part]:
    """A hub data set, or a folder ``load_dataset`` reads (an ImageFolder with ``metadata.jsonl``)."""
    # Lazy: datasets takes seconds to import and only hf: data needs it.
    import datasets

    try:
        # Only the split names: preparing every split of a hub data set would download them all.
        splits = datasets.get_dataset_split_names(name)
    except Exception:  # noqa: BLE001 - unknown here (offline, no split info): load_dataset says why below
        splits = None
    if splits:
        split = choose_split(source, list(splits), split)
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (hub, network, cache, split)
        offline = " (HF_DATASETS_OFFLINE=1: only data sets in the local cache)" \
            if os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true", "TRUE") else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(source, None, f"cannot load the data set{offline}: {reason}") from None
    return _dataset_parts(source, dataset)


def _saved_parts(path: Path, split: str | None) -> list[_Part]:
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
        dataset = dataset[choose_split(str(path), list(dataset), split)]
    elif split is not None:
        raise DataError(path, None, f"data.split is {split!r} but the saved data set has no splits")
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
                yield row, partial(_parse, image, text, text_kind, folder), None


def _parse(image: Any, text: Any, text_kind: str, folder: str) -> tuple[Any, list[tuple[str, str]]]:
    if isinstance(image, _Images):
        raise BadRow(f"{image.count} images in the row; one image per row is supported")
    if isinstance(image, str):
        image = image_ref(image, folder)
    if text_kind == "caption":
        if image is None:
            raise BadRow("missing image")
        return image, [("", answer_text(text, "caption"))]
    messages = sharegpt_messages(text)
    if image is not None and not any(IMAGE_PLACEHOLDER in str(m.get("value")) for m in messages):
        # As LLaVA writes it: the image first in the first user message.
        messages[0] = {**messages[0], "value": f"{IMAGE_PLACEHOLDER}\n{messages[0].get('value')}"}
    return image, conversation_turns(messages, with_image=image is not None)
