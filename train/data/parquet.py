"""Parquet documents (`data.kind="parquet"`), the format of most published pretraining corpora.

    ParquetSource(files, text_key)    one record per row: the UTF-8 bytes of column `text_key`

Only that column is read (pyarrow, the `parquet` extra), one row group at a time: the index is
built from the files' footers (row counts per row group, no data read), and a record read loads
its row group's column once (the last few are cached, so a shuffled stream still reads each
group a bounded number of times per visit). A row whose value is null or not a string (or binary
that is not UTF-8, or a row group that cannot be decoded) gives None or bytes the pipeline
cannot decode: it is skipped and counted like any unusable record (data/pipeline.py).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_CACHED_GROUPS = 4


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise ValueError(
            "data.kind='parquet' needs pyarrow: pip install '.[parquet]' (or pyarrow)"
        ) from None
    return pq


class ParquetSource:
    """Random access to the `text_key` column of Parquet files (grain's source protocol)."""

    def __init__(self, files: Sequence[str], text_key: str):
        pq = _pyarrow_parquet()
        self.files, self.text_key = list(files), text_key
        groups, starts, total = [], [], 0
        for i, path in enumerate(self.files):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # noqa: BLE001 - name the file that does not open
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{path}: not a readable Parquet file ({reason})") from None
            names = meta.schema.to_arrow_schema().names
            if text_key not in names:
                raise ValueError(
                    f"{path}: no column data.text_key={text_key!r} (columns: {', '.join(names)})"
                )
            for g in range(meta.num_row_groups):
                groups.append((i, g))
                starts.append(total)
                total += meta.row_group(g).num_rows
        self._groups, self._starts_G, self._len = groups, np.asarray(starts, np.int64), total
        self._cache: OrderedDict[int, list] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def _column(self, group: int) -> list:
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
        file_index, g = self._groups[group]
        pq = _pyarrow_parquet()
        try:
            table = pq.ParquetFile(self.files[file_index]).read_row_group(
                g, columns=[self.text_key]
            )
            values = table.column(0).to_pylist()
        except Exception:  # noqa: BLE001 - an undecodable group: its rows are unusable
            values = [None] * self._group_rows(group)
        with self._lock:
            self._cache[group] = values
            while len(self._cache) > _CACHED_GROUPS:
                self._cache.popitem(last=False)
        return values

    def _group_rows(self, group: int) -> int:
        end = self._starts_G[group + 1] if group + 1 < len(self._starts_G) else self._len
        return int(end - self._starts_G[group])

    def __getitem__(self, index: int) -> bytes | None:
        if not 0 <= index < self._len:
            raise IndexError(index)
        group = bisect.bisect_right(self._starts_G.tolist(), index) - 1
        value = self._column(group)[index - int(self._starts_G[group])]
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, bytes):
            return value  # decoded (or refused as not UTF-8) like any record
        return None  # null or not text

    def __repr__(self) -> str:
        return f"ParquetSource({self._len} rows in {len(self.files)} files, {self.text_key!r})"
