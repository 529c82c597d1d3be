"""The data layout does not depend on the process count: fixed virtual shards, each process
keeping its rows; an iterator state written under one topology resumes under another; a changed
layout is refused, naming what changed (also through the Checkpointer, never set aside)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpointing import Checkpointer
from train.data.iterator import DataIterator, DataLayoutError, merge_states, shard_plan
from train.data.pipeline import TokenizeRecord, build_dataset

BATCH, SEQ = 8, 12
LAYOUT = {"data.num_shards": 2, "train.batch_size": BATCH, "train.seq_len": SEQ}


class CharTokenizer:
    vocab_size, eos_id = 253, 2

    def encode(self, text):
        return [3 + b % 250 for b in text.encode()]


RECORDS = [(f"doc{i:02d}:" + "x" * (3 * i + 1)).encode() for i in range(23)]


def process_iterator(rows: slice, num_shards: int, layout=None) -> DataIterator:
    """The iterator a process holding global rows `rows` builds (as data/input.py does)."""
    tokenize = TokenizeRecord(lambda raw: raw.decode(), CharTokenizer())
    plan = shard_plan(rows, BATCH, num_shards)
    datasets = {
        p.shard: build_dataset(
            RECORDS,
            tokenize,
            seq_len=SEQ,
            rows_per_shard=BATCH // num_shards,
            seed=0,
            shard_index=p.shard,
            shard_count=num_shards,
        )
        for p in plan
    }
    layout = dict(LAYOUT, **{"data.num_shards": num_shards}) if layout is None else layout
    return DataIterator(datasets, tokenize, plan=plan, layout=layout)


def global_batches(iterators, n):
    out = []
    for _ in range(n):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_shard_plan_covers_rows_whatever_the_process_count():
    assert shard_plan(slice(0, 8), 8, 2) == [(0, 0, 4), (1, 0, 4)]
    assert shard_plan(slice(4, 8), 8, 2) == [(1, 0, 4)]
    assert shard_plan(slice(4, 8), 8, 1) == [(0, 4, 8)]  # processes share shard 0
    assert shard_plan(slice(2, 6), 8, 4) == [(1, 0, 2), (2, 0, 2)]
    assert shard_plan(slice(3, 5), 8, 2) == [(0, 3, 4), (1, 0, 1)]  # a cut shard is fine
    with pytest.raises(ValueError, match=r"data\.num_shards=3 .* train\.batch_size=8"):
        shard_plan(slice(0, 8), 8, 3)


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_two_processes_see_the_batches_of_one(num_shards):
    one = global_batches([process_iterator(slice(0, 8), num_shards)], 5)
    two = global_batches(
        [process_iterator(slice(0, 4), num_shards), process_iterator(slice(4, 8), num_shards)], 5
    )
    assert_same(one, two)


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("after", [1, 3])
def test_state_of_two_processes_resumes_on_one_and_back(num_shards, after):
    reference = global_batches([process_iterator(slice(0, 8), num_shards)], after + 4)
    two = [process_iterator(slice(0, 4), num_shards), process_iterator(slice(4, 8), num_shards)]
    global_batches(two, after)
    files = {(i, 2): it.get_state().decode() for i, it in enumerate(two)}
    # two processes -> one: process 0 of 1 reads both files
    one = process_iterator(slice(0, 8), num_shards)
    one.set_state(merge_states(files, (0, 1)).encode())
    assert one.records == sum(json.loads(f)["records"] for f in files.values())  # the sums
    assert_same(global_batches([one], 2), reference[after : after + 2])
    # ... and one -> two again (each process picks its shards out of the one file)
    files = {(0, 1): one.get_state().decode()}
    back = [process_iterator(slice(0, 4), num_shards), process_iterator(slice(4, 8), num_shards)]
    for i, it in enumerate(back):
        it.set_state(merge_states(files, (i, 2)).encode())
    assert back[1].records == 0
    assert_same(global_batches(back, 2), reference[after + 2 :])


def test_changed_layout_is_refused_naming_what_changed():
    it = process_iterator(slice(0, 8), 2)
    next(it)
    state = it.get_state()
    other = process_iterator(slice(0, 8), 4)
    with pytest.raises(DataLayoutError, match=r"data\.num_shards 2 -> 4"):
        other.set_state(state)
    seq = process_iterator(slice(0, 8), 2, layout=dict(LAYOUT, **{"train.seq_len": 16}))
    with pytest.raises(DataLayoutError, match=r"train\.seq_len 12 -> 16"):
        seq.set_state(state)


def test_checkpointer_refuses_a_changed_layout_and_keeps_the_checkpoint(tmp_path):
    state = {"w": jnp.arange(4.0)}
    it = process_iterator(slice(0, 8), 2)
    next(it)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    ckpt.save(1, state, it)
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    same = process_iterator(slice(0, 8), 2)
    restored, step = Checkpointer(str(tmp_path / "ckpt"), keep=2).restore_latest(abstract, same)
    assert step == 1 and json.loads(same.get_state())["rows"] == BATCH
    with pytest.raises(DataLayoutError, match=r"data\.num_shards 2 -> 4"):
        Checkpointer(str(tmp_path / "ckpt"), keep=2).restore_latest(
            abstract, process_iterator(slice(0, 8), 4)
        )
    assert (tmp_path / "ckpt" / "1").is_dir()  # not set aside as unreadable


def test_checkpoint_of_the_former_per_process_layout_resumes(tmp_path):
    """A checkpoint written by grain's own handler before this layout (one shard per process,
    state {"grain": [...]}) resumes on one process with the default data.num_shards=1."""
    import grain
    import orbax.checkpoint as ocp

    tokenize = TokenizeRecord(lambda raw: raw.decode(), CharTokenizer())
    ds = build_dataset(RECORDS, tokenize, seq_len=SEQ, rows_per_shard=BATCH, seed=0)
    it = iter(ds)
    reference = [next(it) for _ in range(4)]

    class Former:  # the former DataIterator's state, as grain's handler saved it
        def get_state(self):
            it = iter(ds)
            next(it)
            state = {"grain": [it.get_state()], "rows": BATCH, "records": 9, "skipped": 0}
            return json.dumps(state).encode()

    state = {"w": jnp.arange(4.0)}
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(Former())
    )
    mngr.save(1, args=args)
    mngr.wait_until_finished()
    mngr.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    now = process_iterator(slice(0, 8), 1)
    _, step = Checkpointer(str(tmp_path / "ckpt"), keep=2).restore_latest(abstract, now)
    assert step == 1 and now.rows == BATCH  # the former counters carried over
    got = next(now)
    np.testing.assert_array_equal(got["tokens"], reference[1]["tokens"])
    with pytest.raises(DataLayoutError, match=r"data\.num_shards 1 -> 2"):
        Checkpointer(str(tmp_path / "ckpt"), keep=2).restore_latest(
            abstract, process_iterator(slice(0, 8), 2)
        )
