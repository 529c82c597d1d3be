"""data.kind="parquet": the text column read row group by row group, bad rows (null, not UTF-8,
empty) skipped and counted by the pipeline, a missing column named."""

from __future__ import annotations

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from train import config_schema  # noqa: E402
from train.data.pipeline import TokenizeRecord, build_dataset  # noqa: E402
from train.data.sources import decode_with_reason, open_source  # noqa: E402


class ByteTokenizer:
    eos_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def _write(path, texts, other=None, row_group_size=3):
    body = pa.array(texts, type=pa.binary())
    columns = {"body": body, "id": pa.array(range(len(texts)))}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_rows_are_read_and_bad_rows_skipped_and_counted(tmp_path):
    good = [f"document {i}: def f(x): return x + {i}\n".encode() for i in range(7)]
    texts = [good[0], None, good[1], b"\xff\xfe not utf-8", good[2], b"   ", *good[3:]]
    _write(tmp_path / "a.parquet", texts[:6])
    _write(tmp_path / "b.parquet", texts[6:])
    source = open_source("parquet", str(tmp_path / "*.parquet"), text_key="body")
    assert len(source) == len(texts) == 10
    assert [source[i] for i in range(10)] == texts[:1] + [None] + texts[2:]
    reasons = [decode_with_reason(source[i], "text", "body")[1] for i in range(10)]
    assert reasons == [None, "unreadable", None, "not UTF-8", None, "empty", None, None, None, None]

    encode = TokenizeRecord(lambda raw: decode_with_reason(raw, "text", "body")[0], ByteTokenizer())
    ds = build_dataset(source, encode, seq_len=16, rows_per_shard=2, seed=0)
    it = iter(ds)
    batches = [next(it) for _ in range(40)]  # several epochs
    tokens = np.concatenate([b["tokens"].ravel() for b in batches])
    stream = bytes(int(t) - 1 for t in tokens if t).decode("utf-8")
    assert "not utf-8" not in stream and "document 6" in stream
    assert 0.2 <= encode.skipped / encode.records <= 0.4  # 3 of every 10 rows


def test_a_missing_text_column_and_a_bad_file_are_named(tmp_path):
    _write(tmp_path / "a.parquet", [b"x"])
    with pytest.raises(ValueError, match=r"a.parquet: no column data.text_key='text' \(columns: "):
        open_source("parquet", str(tmp_path / "*.parquet"), text_key="text")
    (tmp_path / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="b.parquet: not a readable Parquet file"):
        open_source("parquet", str(tmp_path / "b.parquet"), text_key="body")
    config = config_schema.base_config("tiny")
    config.data.kind = "parquet"
    with pytest.raises(config_schema.ConfigValueError, match="data.path='' must be set"):
        config_schema.validate(config)
