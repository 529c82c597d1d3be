"""The per-process batch iterator over virtual data shards, and its topology-free checkpoint.

The global batch of B rows is cut into `num_shards` virtual shards of B / num_shards rows each
(shard i: rows [i * per, (i + 1) * per)), a fixed number that does not depend on how many
processes share the work. A process builds the shards that overlap the rows its devices hold
(`shard_plan`) and keeps only those rows; when several processes hold rows of one shard, each
builds that shard (the same deterministic pipeline) and keeps its own rows. So 2 processes x 4
devices, 1 x 8 and 1 x 4 all train on the same global batches.

State (`DataIterator.get_state`, JSON bytes; one file per process in a checkpoint):

    {"layout": {"data.num_shards": S, "train.batch_size": B, ...},   what fixes the batches
     "shards": {"i": grain state of shard i, ...},                   the shards this process built
     "rows", "records", "skipped"}                                   this process's counters
     "sources": {"shards": {"i": {"docs": [...], "tokens": [...]}}}  a mixture's, per shard

`DataCheckpointHandler` (orbax) writes that file on save; on restore it reads every process's
file, so a process finds the state of each of its shards whoever wrote it: a checkpoint of one
topology resumes on another. A changed layout (another number of shards, batch size, sequence
length, seed or data kind) cannot continue the same stream: it is refused with a
`DataLayoutError` naming what changed. The counters are per process; after a change of process
count process 0 takes the sums and the others start at 0. Checkpoints of the former layout (one
shard per process, written by grain's own handler) read as data.num_shards = their shard count.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from train.config_schema import ConfigValueError

Batch = dict[str, np.ndarray]

TEXT_FIELDS = {
    "tokens": "tokens",
    "segment_ids": "tokens_segment_ids",
    "positions": "tokens_positions",
}


class DataLayoutError(ConfigValueError):
    """A checkpoint's data iterator cannot continue under this run's data layout (a config
    error: `train.main` prints it as one line)."""


class ShardRows(NamedTuple):
    """Virtual shard `shard` contributes its batch rows [start, stop) to this process."""

    shard: int
    start: int
    stop: int | None  # None: to the end


def shard_plan(rows: slice, global_batch: int, num_shards: int) -> list[ShardRows]:
    """The shards overlapping global batch rows `rows`, and the rows of each this process keeps."""
    if num_shards < 1 or global_batch % num_shards:
        raise ValueError(
            f"data.num_shards={num_shards} must be >= 1 and divide train.batch_size={global_batch}"
        )
    per = global_batch // num_shards
    plan = []
    for shard in range(rows.start // per, (rows.stop - 1) // per + 1):
        lo, hi = max(rows.start, shard * per), min(rows.stop, (shard + 1) * per)
        plan.append(ShardRows(shard, lo - shard * per, hi - shard * per))
    return plan


def _tuples(x: Any) -> Any:
    """JSON turns grain's tuples (e.g. packing slices) into lists; grain compares tuples."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


class StateSnapshot:
    """A `DataIterator` state frozen when taken: what a checkpoint saves via `get_state`."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class DataIterator:
    """Iterator over this process's batch rows, with JSON-bytes state (module docstring).

    `datasets` maps a shard index to that shard's batched grain dataset; `plan` says which rows
    of each shard this process keeps (default: all rows of every given shard, in order).
    `fields` maps batch keys to the packed datasets' keys (default: the text pipeline's;
    multimodal.py has its own); integer arrays come out int32, others as they are. `encode` is
    the per-record step whose `records` / `skipped` counters are reported and saved. `layout`:
    the settings that fix the batches, checked on restore.
    """

    def __init__(
        self,
        datasets: dict[int, grain.IterDataset] | grain.IterDataset,
        encode: Any,
        fields: dict[str, str] | None = None,
        *,
        plan: list[ShardRows] | None = None,
        layout: dict[str, Any] | None = None,
        counter: Any = None,
    ):
        self._datasets = datasets if isinstance(datasets, dict) else {0: datasets}
        self._plan = plan or [ShardRows(i, 0, None) for i in sorted(self._datasets)]
        self._encode = encode
        self._fields = dict(TEXT_FIELDS if fields is None else fields)
        self.layout = dict(layout or {})
        self._counter = counter  # a mixture's per-source counts (mixture.MixtureCounts)
        self._its = {i: iter(ds) for i, ds in self._datasets.items()}
        self.rows = 0

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        shard_batches = {i: next(it) for i, it in self._its.items()}
        parts = [
            {k: v[p.start : p.stop] for k, v in shard_batches[p.shard].items()} for p in self._plan
        ]
        self.rows += sum(len(b["tokens"]) for b in parts)

        def cat(key: str) -> np.ndarray:
            x = np.concatenate([b[key] for b in parts])
            return x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x

        return {name: cat(key) for name, key in self._fields.items()}

    @property
    def skipped(self) -> int:
        return self._encode.skipped

    @property
    def records(self) -> int:
        return self._encode.records

    @property
    def source_counts(self) -> Any:
        """A mixture's `mixture.MixtureCounts` (this process's shards), or None."""
        return self._counter

    def source_metrics(self) -> dict[str, int]:
        """A mixture's tokens per source over all processes (`source_tokens/<name>`; a
        collective with several processes: all call it at the same step); {} for one source."""
        return self._counter.metrics() if self._counter is not None else {}

    def get_state(self) -> bytes:
        state = {
            "layout": self.layout,
            "shards": {str(i): it.get_state() for i, it in self._its.items()},
            "rows": self.rows,
            "records": self._encode.records,
            "skipped": self._encode.skipped,
        }
        if self._counter is not None:
            state["sources"] = self._counter.get_state()
        return json.dumps(state, indent=1).encode()

    def set_state(self, state: bytes | str) -> None:
        """Continues from `state`: this process's own file, or the merge of every process's
        (`merge_states`); raises DataLayoutError when the layout changed or a shard is missing."""
        d = json.loads(state)
        saved = d.get("layout", {})
        changed = [
            f"{k} {saved[k]!r} -> {v!r}"
            for k, v in self.layout.items()
            if k in saved and saved[k] != v
        ]
        if saved and changed:
            raise DataLayoutError(
                "the checkpoint's data stream cannot continue under this run's data layout ("
                + ", ".join(changed)
                + "); resume with the checkpoint's settings, or start a new workdir"
            )
        shards = d["shards"]
        missing = [i for i in self._datasets if str(i) not in shards]
        if missing:
            raise DataLayoutError(
                f"the checkpoint's data iterator has no state for data shards {missing} (it holds "
                f"{sorted(int(i) for i in shards)}); keep data.num_shards when resuming"
            )
        self._its = {i: iter(ds) for i, ds in self._datasets.items()}
        for i, it in self._its.items():
            it.set_state(_tuples(shards[str(i)]))
        self.rows = int(d["rows"])
        self._encode.records = int(d["records"])
        self._encode.skipped = int(d["skipped"])
        if self._counter is not None and "sources" in d:
            self._counter.set_state(d["sources"])

    def start_prefetch(self) -> None:
        """Called by the checkpoint handler after a restore; nothing to start here."""


def merge_states(files: dict[tuple[int, int], str], process: tuple[int, int]) -> str:
    """One state from every process's file {(index, count): JSON}: the union of their shards.

    `process` is this (index, count); its own file's counters are kept when it exists (same
    process count), else process 0 takes the sums and the others zeros.
    """
    states = {k: _upgrade(json.loads(v), *k) for k, v in files.items()}
    layouts = {json.dumps(s.get("layout", {}), sort_keys=True) for s in states.values()}
    if len(layouts) > 1:
        raise DataLayoutError(f"the checkpoint's data files disagree on the layout: {layouts}")
    shards: dict[str, Any] = {}
    for s in states.values():
        shards.update(s["shards"])
    own = states.get(process)
    if own is not None:
        counters = {k: own[k] for k in ("rows", "records", "skipped")}
    else:
        first = process[0] == 0
        counters = {
            k: sum(int(s[k]) for s in states.values()) if first else 0
            for k in ("rows", "records", "skipped")
        }
    layout = next(iter(states.values())).get("layout", {}) if states else {}
    merged = {"layout": layout, "shards": shards, **counters}
    sources = [s["sources"] for s in states.values() if "sources" in s]
    if sources and all("shards" in s for s in sources):  # a mixture's counts, per shard
        merged["sources"] = {"shards": {}}
        for s in sources:
            merged["sources"]["shards"].update(s["shards"])
    elif own is not None and "sources" in own:  # the former per-process form
        merged["sources"] = own["sources"]
    return json.dumps(merged)


def _upgrade(state: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """A state written before virtual shards were fixed ({"grain": [...]}: process i of n held
    shards [i k, (i + 1) k) of n k) in the current form; its layout is that shard count."""
    if "shards" in state:
        return state
    k = len(state["grain"])
    shards = {str(index * k + j): st for j, st in enumerate(state["grain"])}
    return {**state, "shards": shards, "layout": {"data.num_shards": count * k}}


class DataCheckpointHandler:
    """Orbax handler for `DataIterator`: saves this process's file, restores from all of them."""

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        (directory / f"process_{index}-of-{count}.json").write_text(item.get_state().decode())

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        files = {}
        for path in directory.glob("process_*-of-*.json"):
            index, count = path.name[len("process_") : -len(".json")].split("-of-")
            files[(int(index), int(count))] = path.read_text()
        if not files:
            raise FileNotFoundError(f"no data iterator state in {directory}")
        counts = {c for _, c in files}
        if len(counts) > 1:
            raise DataLayoutError(f"{directory} mixes data files of process counts {counts}")
        item.set_state(merge_states(files, (jax.process_index(), jax.process_count())).encode())
        item.start_prefetch()
        return item

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any
