"""Data mixtures (`data.mixture`): several sources sampled in proportion to their weights.

    data.mixture = "stdlib::3;jsonl:/data/web/*.jsonl:1;parquet:/data/code/*.parquet:0.5"

Each `;`-separated entry is KIND:PATH:WEIGHT (KIND one of the text kinds, PATH its globs, empty
for stdlib; WEIGHT > 0); the mixture replaces data.kind / data.path for training. Per virtual
shard (iterator.py), every source gets its own stream (its shard of the records, shuffled with
seed + source index, repeated, tokenized; pipeline.example_stream), and grain's
`IterDataset.mix` draws documents from them in proportion to the normalised weights,
deterministically; the mixed documents are then packed like a single source. Grain's mix state
(each stream's position and the draw count) is part of the iterator state saved with every
checkpoint, so a resumed run continues the same stream. Packing and batching are the
single-source pipeline's (`pipeline.pack_rows`).

Records are decoded per source (`MixtureSource` hands out their UTF-8 text, so the held-out split
of data/split.py and the tokenizer see documents, whatever the kind). `SourceCounter` counts the
documents and tokens each source contributed to the packed stream (after mixing: exact, not
read-ahead), one counter per virtual shard, saved in the iterator state; the loop logs them as
`source_tokens/<name>` (names `<index>_<kind>`): the global count, each shard counted once
(`MixtureCounts`: by the process holding its first row, summed over processes), the same
figures whatever the number of processes.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from train.data.pipeline import example_stream, pack_rows
from train.data.sources import decode_record

TEXT_KINDS = ("stdlib", "text", "jsonl", "arrayrecord", "parquet")


class MixtureEntry(NamedTuple):
    name: str
    kind: str
    path: str
    weight: float


def parse_mixture(spec: str) -> list[MixtureEntry]:
    """`data.mixture` -> its entries; ValueError naming the bad entry."""
    entries = []
    for i, part in enumerate(p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, sep1, rest = part.partition(":")
        path, sep2, weight = rest.rpartition(":")
        if not (sep1 and sep2):
            raise ValueError(f"entry {part!r} is not KIND:PATH:WEIGHT")
        if kind not in TEXT_KINDS:
            raise ValueError(f"entry {part!r}: kind {kind!r} must be one of {TEXT_KINDS}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"entry {part!r}: weight {weight!r} is not a number") from None
        if not w > 0:
            raise ValueError(f"entry {part!r}: weight must be > 0")
        if kind != "stdlib" and not path:
            raise ValueError(f"entry {part!r}: kind {kind!r} needs a path")
        entries.append(MixtureEntry(f"{i}_{kind}", kind, path, w))
    if not entries:
        raise ValueError("has no entries")
    return entries


class MixtureSource:
    """The sources of a mixture as one record source (concatenated), records decoded to UTF-8
    text per their kind (None when unusable). `parts[i]` is source i alone, same decoding."""

    def __init__(self, sources: Sequence[Any], entries: Sequence[MixtureEntry], text_key: str):
        self.entries = list(entries)
        self.parts = [
            DecodedSource(s, "json" if e.kind == "jsonl" else "text", text_key)
            for s, e in zip(sources, entries, strict=True)
        ]
        self._starts = list(np.cumsum([0] + [len(p) for p in self.parts[:-1]]))
        self._len = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, index) - 1
        return self.parts[i][index - self._starts[i]]

    def __repr__(self) -> str:
        return "MixtureSource(" + ", ".join(f"{e.name}: {e.weight:g}" for e in self.entries) + ")"


class DecodedSource:
    """One source's records as UTF-8 document text (None when unusable)."""

    def __init__(self, source: Any, record_format: str, text_key: str):
        self.source, self.record_format, self.text_key = source, record_format, text_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes | None:
        text = decode_record(self.source[index], self.record_format, self.text_key)
        return None if text is None else text.encode("utf-8")

    def __repr__(self) -> str:
        return repr(self.source)


class TagSource:
    """encode, then tag the example with its source index (removed again by SourceCounter)."""

    def __init__(self, encode: Any, index: int):
        self.encode, self.index = encode, index

    def __call__(self, raw: Any) -> dict[str, Any]:
        ex = self.encode(raw)
        return {"tokens": ex["tokens"], "source": self.index}


class SourceCounter:
    """Counts documents and tokens per source as one virtual shard's mixed stream is consumed."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.docs = [0] * len(names)
        self.tokens = [0] * len(names)
        self._lock = threading.Lock()

    def __call__(self, ex: dict[str, Any]) -> dict[str, np.ndarray]:
        with self._lock:
            self.docs[ex["source"]] += 1
            self.tokens[ex["source"]] += len(ex["tokens"])
        return {"tokens": ex["tokens"]}

    def get_state(self) -> dict[str, list[int]]:
        return {"docs": list(self.docs), "tokens": list(self.tokens)}

    def set_state(self, state: dict[str, list[int]]) -> None:
        self.docs, self.tokens = list(state["docs"]), list(state["tokens"])


class MixtureCounts:
    """The per-source counts of the virtual shards this process builds, and their global sum.

    Every shard is counted once: by the process that holds its first row (`owned`), though
    several processes may build it (iterator.py: `shard_plan`); `metrics` sums the owned shards
    over all processes (a collective: every process calls it at the same step), so the figures
    equal a one-process run's on the same data. State: {"shards": {"i": SourceCounter state}}.
    """

    def __init__(self, names: Sequence[str], shards: Sequence[int], owned: Sequence[int]):
        self.names = list(names)
        self.counters = {i: SourceCounter(names) for i in shards}
        self.owned = [i for i in shards if i in set(owned)]

    def local_tokens(self) -> np.ndarray:
        """Tokens per source of this process's owned shards, int64 [S]."""
        out = np.zeros(len(self.names), np.int64)
        for i in self.owned:
            out += np.asarray(self.counters[i].tokens, np.int64)
        return out

    def metrics(self) -> dict[str, int]:
        """`source_tokens/<name>`: tokens per source over all processes (a collective)."""
        tokens = process_sum(self.local_tokens())
        return {f"source_tokens/{n}": int(t) for n, t in zip(self.names, tokens, strict=True)}

    def get_state(self) -> dict[str, Any]:
        return {"shards": {str(i): c.get_state() for i, c in self.counters.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """This process's shards' counts; a state of the former per-process form (one "docs" /
        "tokens" pair) goes to its first owned shard."""
        if "shards" not in state:
            state = {"shards": {str(i): state for i in self.owned[:1]}}
        for i, counter in self.counters.items():
            if str(i) in state["shards"]:
                counter.set_state(state["shards"][str(i)])


def process_sum(x_S: np.ndarray) -> np.ndarray:
    """Sum of an int64 vector over processes (exact to 2^61: sent as two int32 digits of 2^30,
    JAX keeps no int64 without x64)."""
    if jax.process_count() == 1:
        return x_S
    digits_2S = np.stack([x_S >> 30, x_S & (2**30 - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digits_2S), np.int64)
    hi_S, lo_S = gathered.reshape(-1, *digits_2S.shape).sum(0)
    return (hi_S << 30) + lo_S


def mixed_examples(
    parts: Sequence[Any],
    weights: Sequence[float],
    encode: Any,
    counter: SourceCounter,
    *,
    seed: int,
    shard_index: int,
    shard_count: int,
    read_threads: int,
    prefetch: int,
) -> grain.IterDataset:
    """One virtual shard's mixed document stream (module docstring): each source through the
    pipeline's own encode step (`pipeline.example_stream`), drawn by `IterDataset.mix`."""
    streams = [
        example_stream(
            part, TagSource(encode, i), seed + i, shard_index, shard_count, read_threads, prefetch
        )
        for i, part in enumerate(parts)
    ]
    return grain.IterDataset.mix(streams, list(weights)).map(counter)


def build_mixture_dataset(
    source: MixtureSource,
    tokenize: Any,
    counter: SourceCounter,
    *,
    seq_len: int,
    rows_per_shard: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 1,
) -> grain.IterDataset:
    """The packed, batched dataset of one virtual shard of a mixture (pipeline.pack_rows over
    the mixed documents)."""
    examples = mixed_examples(
        source.parts,
        [e.weight for e in source.entries],
        tokenize,
        counter,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        read_threads=read_threads,
        prefetch=8 * rows_per_shard,
    )
    return pack_rows(examples, seq_len, rows_per_shard)
