"""The grain pipeline from records to packed per-host batches, and its checkpointable iterator.

    source[shard::num_shards]       one virtual data shard of the records
      .shuffle(seed).repeat()       deterministic order, reshuffled every epoch
      .map(tokenize)                record -> {"tokens": ids + [eos]}; unreadable, malformed or
      .filter(non-empty)            empty records are skipped and counted
      -> ConcatThenSplit(seq_len)   packing: documents concatenated and cut into rows of seq_len;
                                    a document cut at a row end continues in the next row
      .batch(rows_per_shard)

The global batch is the concatenation of `num_shards` such shards' batches, shard i giving rows
[i * rows_per_shard, (i + 1) * rows_per_shard). A host builds only the shards behind the rows its
devices hold (`shards_for_rows`), so with a fixed `num_shards` the global batch does not depend
on how many processes share the work: 2 hosts x 4 devices train on exactly what 1 x 8 does.

Each row carries `segment_ids` (1, 2, ... per document piece in the row; 0 = padding, which
concat-then-split never needs) and `positions` (restarting at 0 at every piece). A batch is a
dict of int32 numpy arrays [host rows, seq_len]: tokens, segment_ids, positions.

`DataIterator.get_state()` is the grain iterator state plus the skip counters, as JSON bytes;
it is saved with every checkpoint (one file per process) so a resumed run continues with exactly
the next batch, repeating and skipping nothing.
"""

from __future__ import annotations

import json
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
    returned, so the counters are a close (not exact) measure of the consumed stream.
    """

    def __init__(self, decode: Callable[[Any], str | None], tokenizer: Tokenizer):
        self._decode = decode
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.records = 0
        self.skipped = 0

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        text = None
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
    packed = ConcatThenSplitIterDataset(examples, length_struct={"tokens": seq_len})
    return packed.batch(rows_per_shard, drop_remainder=True)


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


def shards_for_rows(rows: slice, global_batch: int, num_shards: int) -> range:
    """The virtual shards behind global batch rows `rows` (ValueError if they cut a shard)."""
    if global_batch % num_shards:
        raise ValueError(
            f"data.num_shards={num_shards} must divide train.batch_size={global_batch}"
        )
    per = global_batch // num_shards
    if rows.start % per or rows.stop % per:
        raise ValueError(
            f"this process holds batch rows [{rows.start}, {rows.stop}), which cut the "
            f"data.num_shards={num_shards} shards of {per} rows; use a data.num_shards that "
            "is a multiple of the process count"
        )
    return range(rows.start // per, rows.stop // per)


def _tuples(x: Any) -> Any:
    """JSON turns grain's tuples (e.g. packing slices) into lists; grain compares tuples."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


TEXT_FIELDS = {
    "tokens": "tokens",
    "segment_ids": "tokens_segment_ids",
    "positions": "tokens_positions",
}


class DataIterator:
    """Iterator over host batches {tokens, segment_ids, positions} with JSON-bytes state.

    Takes the datasets of this host's shards (one or several) and concatenates their batches
    row-wise. `fields` maps batch keys to the packed datasets' keys (default: the text
    pipeline's; multimodal.py has its own); integer arrays come out int32, others as they are.
    `tokenize` is the per-record step whose `records` / `skipped` counters are reported and
    saved. `get_state` / `set_state` use bytes so grain's orbax handler (`grain.checkpoint`)
    writes them as-is, one file per process.
    """

    def __init__(
        self,
        datasets: grain.IterDataset | list[grain.IterDataset],
        tokenize: Any,
        fields: dict[str, str] | None = None,
    ):
        self._datasets = datasets if isinstance(datasets, list) else [datasets]
        self._tokenize = tokenize
        self._fields = dict(TEXT_FIELDS if fields is None else fields)
        self._its = [iter(ds) for ds in self._datasets]
        self.rows = 0

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        bs = [next(it) for it in self._its]
        self.rows += sum(len(b["tokens"]) for b in bs)

        def cat(key: str) -> np.ndarray:
            x = np.concatenate([b[key] for b in bs])
            return x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x

        return {name: cat(key) for name, key in self._fields.items()}

    @property
    def skipped(self) -> int:
        return self._tokenize.skipped

    @property
    def records(self) -> int:
        return self._tokenize.records

    def get_state(self) -> bytes:
        state = {
            "grain": [it.get_state() for it in self._its],
            "rows": self.rows,
            "records": self._tokenize.records,
            "skipped": self._tokenize.skipped,
        }
        return json.dumps(state, indent=1).encode()

    def set_state(self, state: bytes | str) -> None:
        d = json.loads(state)
        if len(d["grain"]) != len(self._datasets):
            raise ValueError(
                f"the checkpoint's data iterator has {len(d['grain'])} shards on this process, "
                f"this run {len(self._datasets)}: keep data.num_shards and the process count "
                "when resuming"
            )
        self._its = [iter(ds) for ds in self._datasets]
        for it, st in zip(self._its, d["grain"], strict=True):
            it.set_state(_tuples(st))
        self.rows = int(d["rows"])
        self._tokenize.records = int(d["records"])
        self._tokenize.skipped = int(d["skipped"])

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing to start here."""
