"""WebDataset tar shards as ``--data``: ``'shards/{00000..00099}.tar'`` (brace patterns and globs;
``.tgz`` and ``.tar.gz`` shards too).

A shard holds members named ``KEY.EXT``; the members of one key make one row: an image
(``jpg``, ``jpeg``, ``png``, ``webp``) and its text (``txt``: the caption; else ``json``: an
object with a ``caption`` or a LLaVA ``conversations`` list). Other extensions are ignored.

Each shard is indexed once, reading only its tar headers (name, type, data offset, size) and
the small text members; an image becomes a ``ShardImage`` (shard, offset, size) read only when
the dataset decodes it. The rows then go through the same map-style dataset as every other
format: a uniform shuffle per epoch, each row exactly once per epoch across DataLoader workers,
exact resume by position, and ``data.preload=false`` reading each image when it is used.
Every member's name and type is checked before any data is read, and nothing is extracted.
A compressed shard cannot be read at an offset, so its images are read while it is indexed and
kept in memory, still encoded (``PackedImage``); for data larger than memory use ``.tar`` shards.
Messages name the shard, the row and its key (``s.tar: row 2 (key '0007'): ...``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from braceexpand import UnbalancedBracesError, braceexpand

from moevlm.data.records import BadRow, Sample, SkippedRows, answer_text, conversation_turns, row_name
from moevlm.errors import DataError

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
COMPRESSED_SUFFIXES = (".tgz", ".tar.gz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")  # in order of preference when a key has both
MiB = 2**20
# Refused from the header alone, before a byte is read: no real training image is near this,
# and a worker reading a forged multi-GB member would take the machine's memory with it.
MAX_IMAGE_BYTES = 64 * MiB
MAX_TEXT_BYTES = 1 * MiB
_BLOCK = tarfile.BLOCKSIZE
# A damaged or cut gzip stream: bad data, a bad CRC or length at its end, or no end at all.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


@dataclass(frozen=True, slots=True)  # slots: one per row, millions of them
class ShardImage:
    """An image member of a tar shard (an ``images.StoredImage``): where its bytes are."""

    shard: str  # absolute path
    member: str
    offset: int
    size: int
    key: str  # "SHARD#KEY": which picture, for the image-level train/validation split

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:  # the shard changed since it was indexed
            raise ValueError(f"cannot decode image: {self.shard} ends inside member {self.member!r}")
        return data


@dataclass(frozen=True, slots=True)
class PackedImage:
    """An image member of a compressed shard (an ``images.StoredImage``), its bytes read at indexing."""

    shard: str  # absolute path
    member: str
    data: bytes
    key: str  # as ShardImage's

    def read_bytes(self) -> bytes:
        return self.data


def is_shard_pattern(data: str | Path) -> bool:
    """Whether ``--data`` names WebDataset shards: a ``.tar``, ``.tgz`` or ``.tar.gz`` file, brace
    pattern or glob."""
    return str(data).lower().endswith(SHARD_SUFFIXES)


def expand_shards(pattern: str) -> list[str]:
    """The shard files of a pattern, in its order (glob matches sorted), each once.

    A brace pattern names its files, so a missing one is a mistake; a glob matching nothing too."""
    try:
        names = list(braceexpand(pattern))
    except UnbalancedBracesError:
        raise DataError(pattern, None, "unbalanced braces in the shard pattern") from None
    shards: dict[str, None] = {}
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = sorted(glob.glob(name))
            if not matches:
                raise DataError(name, None, "no shard matches this pattern")
            shards.update(dict.fromkeys(matches))
        elif os.path.isfile(name):
            shards[name] = None
        else:
            raise DataError(name, None, "no such shard" if not os.path.exists(name) else "not a file")
    return list(shards)


def read_shards(pattern: str | Path, on_bad_row: str = "error",
                max_rows: int | None = None) -> tuple[list[Sample], SkippedRows]:
    """Index the shards of ``pattern`` into samples, as ``records.read_samples`` reads a file.

    A row's ``source`` is its shard and ``row`` the key's position in it (1-based, in member order)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be error or skip, not {on_bad_row!r}")
    samples: list[Sample] = []
    skipped = SkippedRows()
    for shard in expand_shards(str(pattern)):
        if max_rows is not None and len(samples) >= max_rows:
            break
        try:
            left = None if max_rows is None else max_rows - len(samples)
            samples += _Shard(shard, on_bad_row, skipped).samples(left)
        except OSError as err:
            raise DataError(shard, None, f"cannot read shard: {err.strerror or err}") from None
    if not samples:
        raise DataError(pattern, None, "no usable rows" + (f" (skipped {skipped})" if skipped else ""))
    return samples, skipped


class _Shard:
    """One shard's index: its keys in member order, each with its members by extension."""

    def __init__(self, path: str, on_bad_row: str, skipped: SkippedRows):
        self.path, self.on_bad_row, self.skipped = path, on_bad_row, skipped
        self.absolute = os.path.abspath(path)
        self.keys: dict[str, dict[str, tarfile.TarInfo]] = {}
        self.problems: dict[str, str] = {}  # key -> the first problem of its members
        self.file_size = os.path.getsize(path)
        self.compressed = path.lower().endswith(COMPRESSED_SUFFIXES)
        self.data: dict[str, bytes] = {}  # a compressed shard's members, by name, read while indexing
        self._last_key, self._last_member = "", ""  # the member being indexed, for messages

    def samples(self, limit: int | None) -> list[Sample]:
        with open(self.path, "rb") as f:
            self._index(gzip.GzipFile(fileobj=f, mode="rb") if self.compressed else f)
            out = []
            for row, (key, members) in enumerate(self.keys.items(), start=1):
                if limit is not None and len(out) >= limit:
                    break
                try:
                    sample = self._sample(f, key, members, row)
                except BadRow as bad:
                    self._bad(row, str(bad), key)
                    continue
                if sample is not None:
                    out.append(sample)
        return out

    def _bad(self, row: int | None, problem: str, key: str | None) -> None:
        where = row_name(row, None if key is None else _label(key))
        if self.on_bad_row == "error":
            raise DataError(self.path, where, problem)
        self.skipped.add(self.path, where, problem)

    def _row_of(self, key: str) -> int:
        return list(self.keys).index(key) + 1 if key in self.keys else len(self.keys) + 1

    def _index(self, f) -> None:
        """Read the headers; a member's problem stops the run here, before its data is read. Of a
        compressed shard (``f`` a ``GzipFile``, read forwards only) the data of each member a row
        uses is read here too."""
        kind = "a gzip-compressed" if self.compressed else "an uncompressed"
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.ReadError, *_GZIP_ERRORS) as err:
            raise DataError(self.path, None, f"not {kind} tar file ({err})") from None
        try:
            while (info := tar.next()) is not None:
                if self._add(info) and self.compressed:
                    f.seek(info.offset_data)
                    self.data[info.name] = f.read(info.size)
            # tarfile ends quietly at a header it cannot parse or at the end of the file; a whole
            # archive ends with zero blocks there.
            f.seek(tar.offset)
            end = f.read(_BLOCK)
            if self.compressed:
                while f.read(MiB):  # to the end of the gzip stream, which checks its CRC and length
                    pass
        except (tarfile.ReadError, *_GZIP_ERRORS) as err:  # data running past the end of the file
            if self._last_key not in self.problems:  # else counted already, as truncated
                self._bad(self._row_of(self._last_key), f"shard is truncated or damaged after member "
                                                        f"{self._last_member!r} ({err})", self._last_key)
            return
        if len(end) < _BLOCK or end.count(0) != _BLOCK:
            where = "ends" if len(end) < _BLOCK else "has a damaged header"
            self._bad(len(self.keys) + 1, f"shard is truncated or damaged: it {where} at byte {tar.offset}, "
                                          "not at the tar end-of-archive blocks", None)

    def _add(self, info: tarfile.TarInfo) -> bool:
        """Index a member from its header; whether it is one a row uses."""
        name = info.name
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
        self._last_key, self._last_member = key, name
        problem = _member_problem(info, ext)
        if problem is None and info.isdir():
            return False
        if problem is None and ext not in IMAGE_EXTENSIONS + TEXT_EXTENSIONS:
            return False  # metadata (.cls, .__key__ ...) a caption data set does not use
        if problem is None and not self.compressed and info.offset_data + info.size > self.file_size:
            problem = (f"shard is truncated: member {name!r} needs {info.offset_data + info.size} bytes, "
                       f"the file has {self.file_size}")
        members = self.keys.setdefault(key, {})
        if problem is None and ext in members:
            problem = f"member {name!r} appears twice" if members[ext].name == name else \
                f"key {key!r} has two {ext} members"
        if problem is not None:
            if self.on_bad_row == "error":
                raise DataError(self.path, row_name(self._row_of(key), _label(key)), problem)
            self.problems.setdefault(key, problem)
            return False
        members[ext] = info
        return True

    def _sample(self, f, key: str, members: dict[str, tarfile.TarInfo], row: int) -> Sample | None:
        if key in self.problems:
            raise BadRow(self.problems[key])
        images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
        texts = [ext for ext in TEXT_EXTENSIONS if ext in members]
        if not images and not texts:
            return None  # only members of other kinds
        if len(images) > 1:
            raise BadRow(f"key {key!r} has {len(images)} images ({', '.join(members[e].name for e in images)})")
        if not images:
            raise BadRow(f"key {key!r} has text but no image")
        if not texts:
            raise BadRow(f"key {key!r} has an image but no txt or json text")
        image, text = members[images[0]], members[texts[0]]
        turns = _turns(self._read(f, text), texts[0])
        picture = f"{self.absolute}#{key}"
        stored = PackedImage(self.absolute, image.name, self.data[image.name], picture) if self.compressed else \
            ShardImage(self.absolute, image.name, image.offset_data, image.size, picture)
        return Sample(image=stored, turns=turns, source=self.path, row=row, label=_label(key))

    def _read(self, f, member: tarfile.TarInfo) -> bytes:
        if self.compressed:
            return self.data[member.name]
        f.seek(member.offset_data)
        return f.read(member.size)


def _label(key: str) -> str:
    """How messages name a row of a shard besides its number: its key."""
    return f"key {key!r}"


def _member_problem(info: tarfile.TarInfo, ext: str) -> str | None:
    """What makes a member unacceptable, from its header alone."""
    name = info.name
    if name.startswith("/"):
        return f"member {name!r} has an absolute name"
    if ".." in name.split("/"):
        return f"member {name!r} has a name with '..' that points outside the shard"
    if info.issym() or info.islnk():
        return f"member {name!r} is a link (to {info.linkname!r}); only regular files are read"
    if info.isdir():
        return None
    if info.issparse() or not info.isreg():
        return f"member {name!r} is a device, pipe or other special file; only regular files are read"
    limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_BYTES if ext in TEXT_EXTENSIONS else None
    if limit is not None and info.size > limit:
        return f"member {name!r} is {info.size} bytes, over the {limit // MiB} MiB limit for a {ext} member"
    return None


def _turns(raw: bytes, ext: str) -> list[tuple[str, str]]:
    """A key's text, by the rules the other formats use for a caption or a conversation."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRow("text is not valid UTF-8") from None
    if ext == "txt":
        return [("", answer_text(text, "caption"))]
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRow(f"not valid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise BadRow("not valid JSON: nested too deeply") from None
    if not isinstance(item, dict):
        raise BadRow(f"expected a JSON object, got {type(item).__name__}")
    if "conversations" in item:
        return conversation_turns(item["conversations"])
    return [("", answer_text(item.get("caption"), "caption"))]
