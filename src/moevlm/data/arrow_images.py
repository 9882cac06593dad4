"""Images stored inside Arrow and Parquet files, read only when the dataset decodes them.

``ArrowImage`` and ``ParquetImage`` are ``images.StoredImage`` values: a file, a row and a
column, small enough to pickle into DataLoader workers. Arrow files are memory-mapped (the
operating system pages image bytes in as they are read, nothing is copied up front); a Parquet
file is read one row group at a time, the last few kept per process, so reading the rows in
order (``data.preload=true``) reads each group once. (Streaming reads rows in shuffled order:
``hf_datasets`` gives it a Parquet file converted to Arrow.)
A cell is an ``Image`` feature's ``{bytes, path}``, plain bytes, or a list holding one of these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=64)
def arrow_table(path: str):
    """The ``pyarrow.Table`` of an Arrow file (IPC stream, as ``datasets`` writes, or IPC file), memory-mapped."""
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


@lru_cache(maxsize=4)
def _parquet_group(path: str, group: int, column: str):
    # Lazy: pyarrow takes a while to import and only these formats need it.
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).combine_chunks()


def image_bytes(cell: Any, folder: str) -> bytes:
    """The encoded image of one cell; a path-only ``Image`` cell is read from disk (relative
    paths under ``folder``, as ``datasets`` resolves them). ValueError as ``images.open_image``."""
    if isinstance(cell, list):
        cell = cell[0] if cell else None
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
        if cell:
            try:
                with open(os.path.join(folder, cell), "rb") as f:
                    return f.read()
            except OSError as err:
                raise ValueError(f"cannot decode image: cannot read {cell}: {err.strerror or err}") from None
    if isinstance(cell, bytes) and cell:
        return cell
    raise ValueError("cannot decode image: no image bytes")


@dataclass(frozen=True)
class ArrowImage:
    path: str
    row: int  # 0-based, in this file
    column: str
    folder: str  # where a path-only cell's relative path starts

    def read_bytes(self) -> bytes:
        return image_bytes(arrow_table(self.path).column(self.column)[self.row].as_py(), self.folder)

    @property
    def key(self) -> str:
        return f"{self.path}#{self.row}"


@dataclass(frozen=True)
class ParquetImage:
    path: str
    group: int  # row group
    row: int  # 0-based, in the row group
    column: str
    folder: str

    def read_bytes(self) -> bytes:
        return image_bytes(_parquet_group(self.path, self.group, self.column)[self.row].as_py(), self.folder)

    @property
    def key(self) -> str:
        return f"{self.path}#{self.group}.{self.row}"
