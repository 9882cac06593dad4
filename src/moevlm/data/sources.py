"""``--data`` to rows, whatever the format: picks the reader from the spec and reads it.

| spec | reader |
|---|---|
| WebDataset shards (``shards/{00000..00099}.tar``, globs) | ``webdataset.read_shards`` |
| ``hf:NAME[:split]``, a ``save_to_disk`` folder, ``.parquet``, ``.arrow`` | ``hf_datasets.read_hf`` |
| a folder with ``metadata.jsonl`` (an ImageFolder) | ``hf_datasets.read_hf`` |
| a ``.json`` file holding one object | ``coco.read_coco`` (COCO captions) |
| another folder | ``image_folder.read_image_folder`` |
| ``.csv``, ``.jsonl``, ``.json`` (a list) | ``records.read_samples`` |
"""

from __future__ import annotations

from pathlib import Path

from moevlm.config import DataConfig
from moevlm.data.coco import is_coco_file, read_coco
from moevlm.data.hf_datasets import is_image_folder_dataset, is_saved_dataset, read_hf
from moevlm.data.image_folder import read_image_folder
from moevlm.data.records import Sample, SkippedRows, read_samples
from moevlm.data.webdataset import is_shard_pattern, read_shards

HF_SUFFIXES = (".parquet", ".arrow")
RECORD_SUFFIXES = (".csv", ".jsonl", ".json")


def read_data(spec: str | Path, data: DataConfig, max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    """The rows of ``spec`` and the rows skipped (``data.on_bad_row=skip``), by reason."""
    text = str(spec)
    path = Path(spec)
    if is_shard_pattern(path):
        return read_shards(path, data.on_bad_row, max_rows)
    if (text.startswith("hf:") or path.suffix.lower() in HF_SUFFIXES or is_saved_dataset(path)
            or is_image_folder_dataset(path)):
        return read_hf(text, data, max_rows)
    if path.is_dir() and path.suffix.lower() not in RECORD_SUFFIXES:  # "d.csv/" is a mistake, said as such there
        return read_image_folder(path, data.on_bad_row, max_rows)
    if is_coco_file(path):
        return read_coco(path, data.on_bad_row, max_rows, data.image_root)
    return read_samples(path, data.on_bad_row, max_rows)
