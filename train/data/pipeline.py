"""The grain pipeline from records to packed per-host batches, and its checkpointable iterator.

    source[shard::num_shards]       one virtual data shard of the records
      .shuffle(seed).repeat()       deterministic order, reshuffled every epoch
      .map(tokenize)                record -> {"tokens": ids + [eos]}; unreadable, malformed or
      .filter(non-empty)            empty records are skipped and counted
      -> ConcatThenSplit(seq_len)   packing: documents concatenated and cut into rows of seq_len;
                                    a document cut at a row end continues in the next row
      .batch(rows_per_shard)

The global batch is the concatenation of `num_shards` such shards' batches, shard i giving rows
[i * rows_per_shard, (i + 1) * rows_per_shard). Which shards a process builds, and the iterator
whose state is saved with every checkpoint, are in iterator.py; `input.py` puts them together.

Each row carries `segment_ids` (1, 2, ... per document piece in the row; 0 = padding, which
concat-then-split never needs) and `positions` (restarting at 0 at every piece). A batch is a
dict of int32 numpy arrays [host rows, seq_len]: tokens, segment_ids, positions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from train.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]


class TokenizeRecord:
    """record -> {"tokens": int32 ids + [eos]}, or {"tokens": []} (skipped) when unusable.

    Counts records read and records skipped. Grain reads a few records ahead of the rows it has
    returned, so the counters are a close (not exact) measure of the consumed stream. `select`
    (optional, a predicate on the raw record: data/split.py) drops the records it refuses
    before decoding; they are counted as `held_out`, not as skipped.
    """

    def __init__(
        self,
        decode: Callable[[Any], str | None],
        tokenizer: Tokenizer,
        select: Callable[[Any], bool] | None = None,
    ):
        self._decode = decode
        self._tokenizer = tokenizer
        self._select = select
        self._lock = threading.Lock()
        self.records = 0
        self.skipped = 0
        self.held_out = 0

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        text = None
        if self._select is not None and not self._select(raw):
            with self._lock:
                self.held_out += 1
            return {"tokens": np.zeros((0,), np.int32)}
        try:
            text = self._decode(raw)
            ids = self._tokenizer.encode(text) if text is not None else []
        except Exception:  # noqa: BLE001 - any unusable record is skipped, never fatal
            ids = []
        with self._lock:
            self.records += 1
            self.skipped += not ids
        if not ids:
            return {"tokens": np.zeros((0,), np.int32)}
        return {"tokens": np.asarray([*ids, self._tokenizer.eos_id], np.int32)}


def build_dataset(
    source: Any,
    tokenize: TokenizeRecord,
    *,
    seq_len: int,
    rows_per_shard: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 1,
) -> grain.IterDataset:
    """The packed, batched dataset of one virtual shard (see the module docstring)."""
    examples = example_stream(
        source, tokenize, seed, shard_index, shard_count, read_threads, 8 * rows_per_shard
    )
    return pack_rows(examples, seq_len, rows_per_shard)


def pack_rows(examples: grain.IterDataset, seq_len: int, rows: int) -> grain.IterDataset:
    """Concat-then-split packing into rows of `seq_len` tokens, `rows` rows per batch (a last
    partial batch is dropped): the training pipeline's, a mixture's and held-out evaluation's."""
    packed = ConcatThenSplitIterDataset(examples, length_struct={"tokens": seq_len})
    return packed.batch(rows, drop_remainder=True)


def example_stream(
    source: Any,
    encode: Callable[[Any], dict[str, np.ndarray]],
    seed: int,
    shard_index: int,
    shard_count: int,
    read_threads: int,
    prefetch: int,
) -> grain.IterDataset:
    """Records of one virtual shard, shuffled (seed) and repeated forever, encoded; examples whose
    `tokens` are empty (unusable records, counted by `encode`) are dropped."""
    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"data shard {shard_index}/{shard_count} of {source!r} is empty")
    ds = ds.shuffle(seed=seed).repeat().map(encode).filter(lambda ex: len(ex["tokens"]) > 0)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(read)
