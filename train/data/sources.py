"""Random-access record sources (grain `RandomAccessDataSource` protocol: len + getitem).

A record is raw bytes, or None when it cannot be read (the pipeline skips and counts those):

    kind "text"         one record per file (a whole file is one document); `path` is a glob
    kind "jsonl"        one record per line of JSON-lines files; the document is `text_key`
    kind "arrayrecord"  one record per ArrayRecord entry; UTF-8 text, or JSON when
                        `record_format="json"`
    kind "parquet"      one record per row of Parquet files: column `text_key` (parquet.py)
    kind "stdlib"       "text" over the Python standard library's *.py files (see stdlib.py)

`path` may hold several comma-separated globs. `decode_record` turns a raw record into the
document text, returning None for an empty or malformed record (`decode_with_reason` says why).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from train.data.parquet import ParquetSource
from train.data.stdlib import stdlib_files

KINDS = ("text", "jsonl", "arrayrecord", "parquet", "stdlib")


def list_files(pattern: str) -> list[str]:
    """The sorted files matched by comma-separated glob patterns (`**` recurses)."""
    files: set[str] = set()
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            files.update(
                f for f in glob.glob(os.path.expanduser(part), recursive=True) if os.path.isfile(f)
            )
    return sorted(files)


class FileSource:
    """One record per file: the file's bytes (None if it cannot be read)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> bytes | None:
        try:
            with open(self.files[index], "rb") as f:
                return f.read()
        except OSError:
            return None

    def __repr__(self) -> str:
        return f"FileSource({len(self.files)} files)"


class JsonlSource:
    """One record per non-blank line of JSON-lines files, by a byte-offset index built once."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        file_ids, offsets, lengths = [], [], []
        for i, path in enumerate(self.files):
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_ids.append(i)
                        offsets.append(pos)
                        lengths.append(len(line))
                    pos += len(line)
        self._file_N = np.asarray(file_ids, np.int32)
        self._offset_N = np.asarray(offsets, np.int64)
        self._length_N = np.asarray(lengths, np.int64)

    def __len__(self) -> int:
        return len(self._file_N)

    def file_index(self, index: int) -> int:
        """Which of `files` holds line `index`."""
        return int(self._file_N[index])

    def __getitem__(self, index: int) -> bytes | None:
        try:
            with open(self.files[self._file_N[index]], "rb") as f:
                f.seek(int(self._offset_N[index]))
                return f.read(int(self._length_N[index]))
        except OSError:
            return None

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} lines in {len(self.files)} files)"


def open_source(kind: str, path: str, *, max_bytes: int = 0, text_key: str = "text"):
    """The record source of a `data.kind` and `data.path` (see the module docstring).

    For kind "stdlib", `path` (optional) replaces the stdlib root and `max_bytes` caps the corpus;
    for kind "parquet", `text_key` is the column read.
    """
    if kind == "stdlib":
        return FileSource(stdlib_files(path or None, max_bytes=max_bytes))
    files = list_files(path)
    if not files:
        dirs = [p.strip() for p in path.split(",") if os.path.isdir(os.path.expanduser(p.strip()))]
        if dirs:
            ext = {"jsonl": "*.jsonl", "arrayrecord": "*.array_record", "parquet": "*.parquet"}
            ext = ext.get(kind, "*.txt")
            raise FileNotFoundError(
                f"data.path={path!r} is a directory; give a glob of its files, like "
                f"{os.path.join(dirs[0], ext)!r} (or {os.path.join(dirs[0], '**', ext)!r})"
            )
        raise FileNotFoundError(f"data.path={path!r} matches no files")
    if kind == "text":
        return FileSource(files)
    if kind == "jsonl":
        return JsonlSource(files)
    if kind == "arrayrecord":
        return _array_record_source(files)
    if kind == "parquet":
        return ParquetSource(files, text_key)
    raise ValueError(f"data.kind={kind!r} must be one of {KINDS}")


def _array_record_source(files: list[str]):
    """grain's ArrayRecord source, or a ValueError naming the first file that does not open."""
    try:
        return grain.sources.ArrayRecordDataSource(files)
    except Exception:  # noqa: BLE001 - find and name the unreadable file
        for path in files:
            try:
                grain.sources.ArrayRecordDataSource([path])
            except Exception as e:  # noqa: BLE001
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{path}: not a readable ArrayRecord file ({reason})") from None
        raise


def decode_record(raw: bytes | None, record_format: str, text_key: str) -> str | None:
    """The document text of a raw record, or None (unreadable, not UTF-8, bad JSON, empty)."""
    return decode_with_reason(raw, record_format, text_key)[0]


def decode_with_reason(
    raw: bytes | None, record_format: str, text_key: str
) -> tuple[str | None, str | None]:
    """(document text, None), or (None, why the record is unusable: "unreadable", "not UTF-8",
    "not JSON", "no key 'text'", "'text' is not a string", "not a JSON object", "empty")."""
    if raw is None:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if record_format == "json":
        try:
            obj = json.loads(text)
        except ValueError:
            return None, "not JSON"
        if not isinstance(obj, dict):
            return None, "not a JSON object"
        if text_key not in obj:
            return None, f"no key {text_key!r}"
        text = obj[text_key]
        if not isinstance(text, str):
            return None, f"{text_key!r} is not a string"
    return (text, None) if text.strip() else (None, "empty")
