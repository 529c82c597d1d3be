"""The input pipeline of a run: one function decides text vs multimodal and builds it.

    pipe = input_pipeline(config, prepared, mesh, model_cfg)
    batch = pipe.next_global_batch()      # {key: jax.Array [B, ...]} sharded over the batch axes

This process loads only the rows its devices hold (`distributed.process_batch_slice`), from the
virtual shards behind them (iterator.py: `shard_plan`; `data.num_shards`, default 1, does not
depend on the process count), and `jax.make_array_from_process_local_data` assembles the global
arrays. `pipe.iterator` is what checkpoints save and restore.

The training loop reads ahead of the step on a helper thread: `wait_ready(timeout_s)` starts the
read of the next host batch (if none is under way) and says whether it arrived; `take()` turns it
into the global batch. A starved pipeline (a source that blocks, or one that skips record after
record) thus never holds a graceful stop hostage (train/step_gate.py decides, across processes,
between waiting, stepping and stopping): while a read is under way or its batch was not taken,
`pipe.position()` is the iterator's state before that read, so a checkpoint never counts a batch
that was not trained on (an abandoned read stays on its daemon thread until the process exits).
`next_global_batch()` reads inline.

Text kinds: pipeline.py (tokenize, concat-then-split) with keys tokens, segment_ids, positions
[B, T]. Multimodal kinds: multimodal.py (first-fit packing with a patch budget) with tokens,
segment_ids, loss_mask [B, T], pixel_values [B, P_row, F], image_grid_thw [B, G_row, 3].
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import jax
import ml_collections

import qwen35_jax
from qwen35_jax import distributed
from train import config_schema
from train.data.iterator import DataIterator, StateSnapshot, shard_plan
from train.data.mixture import MixtureCounts, MixtureSource, build_mixture_dataset
from train.data.multimodal import (
    MULTIMODAL_FIELDS,
    VisualSpec,
    build_multimodal_dataset,
)
from train.data.multimodal import (
    batch_shapes as multimodal_batch_shapes,
)
from train.data.pipeline import TokenizeRecord, build_dataset
from train.data.split import SplitSide
from train.prepare import PreparedData, multimodal_encoder
from train.state import batch_shardings


class _Read:
    """One host batch read on a daemon thread; `before` is the iterator's state ahead of it."""

    def __init__(self, iterator: DataIterator):
        self.before = StateSnapshot(iterator.get_state())
        self._box: queue.Queue = queue.Queue(maxsize=1)
        self._result: tuple[bool, Any] | None = None
        threading.Thread(
            target=self._read, args=(iterator,), name="input-read", daemon=True
        ).start()

    def _read(self, iterator: DataIterator) -> None:
        try:
            self._box.put((True, next(iterator)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread by `result`
            self._box.put((False, e))

    def wait(self, timeout_s: float) -> bool:
        if self._result is None:
            try:
                self._result = self._box.get(timeout=timeout_s)
            except queue.Empty:
                return False
        return True

    def result(self) -> dict[str, Any]:
        if self._result is None:
            self._result = self._box.get()
        ok, value = self._result
        if not ok:
            raise value
        return value


@dataclasses.dataclass
class InputPipeline:
    """This process's iterator, and the global shape and sharding of every batch key."""

    iterator: DataIterator
    shapes: dict[str, tuple[int, ...]]
    shardings: dict[str, jax.sharding.NamedSharding]
    _read: _Read | None = None  # under way, or arrived and not taken

    def position(self) -> DataIterator | StateSnapshot:
        """What a checkpoint saves as the data position: the iterator, or while a read is under
        way or its batch was not taken, the iterator's state before that read."""
        return self.iterator if self._read is None else self._read.before

    def wait_ready(self, timeout_s: float) -> bool:
        """Starts reading the next host batch on a helper thread (unless a read is under way) and
        waits at most `timeout_s` for it: whether it arrived (or its read failed: `take` raises)."""
        if self._read is None:
            self._read = _Read(self.iterator)
        return self._read.wait(timeout_s)

    def take(self) -> dict[str, jax.Array]:
        """The global batch of the read `wait_ready` started (waiting for it if needed)."""
        read = self._read or _Read(self.iterator)
        host = read.result()
        self._read = None
        return self._global(host)

    def next_global_batch(self) -> dict[str, jax.Array]:
        """The next global batch, read inline."""
        return self._global(next(self.iterator))

    def _global(self, host: dict[str, Any]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.shardings[k], v, self.shapes[k])
            for k, v in host.items()
        }


def data_layout(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that fix the global batches (a checkpoint resumes only under the same)."""
    keys = ["data.kind", "data.num_shards", "train.batch_size", "train.seq_len", "train.seed"]
    keys += ["data.eval_fraction", "data.mixture"]  # they change the training stream
    if config.data.kind in config_schema.MULTIMODAL_KINDS:
        keys += ["data.patches_per_row", "data.images_per_row"]
    return {k: config_schema.get_key(config, k) for k in keys}


def batch_shapes(
    config: ml_collections.ConfigDict, model_cfg: qwen35_jax.Qwen35Config | None = None
) -> dict[str, tuple[int, ...]]:
    """The global shape of every batch key (text: tokens, segment_ids, positions [B, T];
    multimodal kinds as above, the patch geometry from `model_cfg`, default `config.model`)."""
    t, d = config.train, config.data
    if d.kind in config_schema.MULTIMODAL_KINDS:
        spec = VisualSpec.of(model_cfg or config_schema.model_config(config))
        return multimodal_batch_shapes(
            t.batch_size, t.seq_len, d.patches_per_row, d.images_per_row, spec.patch_dim
        )
    return {k: (t.batch_size, t.seq_len) for k in ("tokens", "segment_ids", "positions")}


def input_pipeline(
    config: ml_collections.ConfigDict,
    prepared: PreparedData,
    mesh: jax.sharding.Mesh,
    model_cfg: qwen35_jax.Qwen35Config | None = None,
) -> InputPipeline:
    """The run's input pipeline on `mesh` (multimodal kinds need `model_cfg` for the special
    token ids and the patch geometry; default: `config.model`)."""
    t, d = config.train, config.data
    counter = None
    rows = distributed.process_batch_slice(mesh, t.batch_size)
    try:
        plan = shard_plan(rows, t.batch_size, d.num_shards)
    except ValueError as e:
        raise config_schema.ConfigValueError(str(e)) from None
    common = dict(
        seq_len=t.seq_len,
        rows_per_shard=t.batch_size // d.num_shards,
        seed=t.seed,
        shard_count=d.num_shards,
        read_threads=d.read_threads,
    )
    # the documents data/split.py holds out are evaluation.py's, never trained on
    select = SplitSide(d.eval_fraction, held_out=False) if d.eval_fraction else None
    if d.kind in config_schema.MULTIMODAL_KINDS:
        model_cfg = model_cfg or config_schema.model_config(config)
        spec = VisualSpec.of(model_cfg)
        encode = multimodal_encoder(config, prepared.tokenizer, spec, select)
        datasets = {
            p.shard: build_multimodal_dataset(
                prepared.source,
                encode,
                patches_per_row=d.patches_per_row,
                images_per_row=d.images_per_row,
                shard_index=p.shard,
                **common,
            )
            for p in plan
        }
        fields = MULTIMODAL_FIELDS
    else:
        encode = TokenizeRecord(prepared.decode, prepared.tokenizer, select)
        if isinstance(prepared.source, MixtureSource):  # data.mixture: data/mixture.py
            names = [e.name for e in prepared.source.entries]
            owned = [p.shard for p in plan if p.start == 0]  # each shard counted once
            counter = MixtureCounts(names, [p.shard for p in plan], owned)
            datasets = {
                p.shard: build_mixture_dataset(
                    prepared.source,
                    encode,
                    counter.counters[p.shard],
                    shard_index=p.shard,
                    **common,
                )
                for p in plan
            }
        else:
            datasets = {
                p.shard: build_dataset(prepared.source, encode, shard_index=p.shard, **common)
                for p in plan
            }
        fields = None
    shapes = batch_shapes(config, model_cfg)
    iterator = DataIterator(
        datasets, encode, fields, plan=plan, layout=data_layout(config), counter=counter
    )
    return InputPipeline(iterator, shapes, batch_shardings(mesh, shapes))
