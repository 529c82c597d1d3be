"""data.mixture: documents drawn in proportion to the weights (within sampling error), tokens
per source counted, exact resume of the mixed stream and its counts, bad specs named."""

from __future__ import annotations

import json
import math
import os
import runpy

import numpy as np
import pytest

from qwen35_jax import mesh as mesh_lib
from train import config_schema
from train.data.input import input_pipeline
from train.data.mixture import parse_mixture
from train.prepare import PreparedData, _open_training_source, decode_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteTokenizer:
    eos_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def _config(tmp_path, mixture: str, **train):
    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny_cpu.py"))["get_config"]()
    config.data.mixture = mixture
    config.data.num_shards = 2
    config.train.batch_size = 8
    config.train.seq_len = 32
    config.train.update(train)
    config_schema.validate(config)
    return config


def _pipeline(config):
    source = _open_training_source(config.data)
    decode = lambda raw: decode_record(raw, "text", "text")  # noqa: E731
    prepared = PreparedData(source, decode, ByteTokenizer(), {})
    return input_pipeline(config, prepared, mesh_lib.mesh_from_config(config.mesh))


@pytest.fixture
def mixture(tmp_path):
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"A{i} " + "a" * (5 + i % 7)}) + "\n")
    for i in range(40):
        (tmp_path / f"b{i}.txt").write_text(f"B{i} " + "b" * (20 + i % 5))
    return f"jsonl:{tmp_path / 'a.jsonl'}:3; text:{tmp_path / 'b*.txt'}:1"


def test_documents_are_drawn_in_proportion_and_tokens_counted(tmp_path, mixture):
    pipe = _pipeline(_config(tmp_path, mixture))
    counts = {"A": 0, "B": 0}
    for _ in range(60):
        batch = pipe.next_global_batch()
        tokens_BT = np.asarray(batch["tokens"])
        seg_BT = np.asarray(batch["segment_ids"])
        starts = (np.asarray(batch["positions"]) == 0) & (seg_BT > 0)
        first = tokens_BT[starts] - 1  # the first byte of each document piece
        counts["A"] += int(np.sum(first == ord("A")))
        counts["B"] += int(np.sum(first == ord("B")))
    n = counts["A"] + counts["B"]
    share = counts["A"] / n
    assert n > 500 and abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n), counts
    per_source = pipe.iterator.source_metrics()
    assert set(per_source) == {"source_tokens/0_jsonl", "source_tokens/1_text"}
    total = sum(per_source.values())
    assert total >= 60 * 8 * 32  # every packed token came from one of them (+ a partial doc)


def test_a_mixture_resumes_exactly(tmp_path, mixture):
    config = _config(tmp_path, mixture)
    pipe = _pipeline(config)
    for _ in range(7):
        pipe.iterator.__next__()
    state = pipe.iterator.get_state()
    after = [next(pipe.iterator) for _ in range(5)]
    counts = pipe.iterator.source_metrics()

    resumed = _pipeline(config)
    resumed.iterator.set_state(state)
    again = [next(resumed.iterator) for _ in range(5)]
    for x, y in zip(after, again, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert resumed.iterator.source_metrics() == counts
    saved = json.loads(state)
    assert saved["layout"]["data.mixture"] == mixture and "sources" in saved


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jsonl:/x/*.jsonl", "is not KIND:PATH:WEIGHT"),
        ("csv:/x/*.csv:1", "kind 'csv' must be one of"),
        ("jsonl:/x/*.jsonl:0", "weight must be > 0"),
        ("jsonl::1", "kind 'jsonl' needs a path"),
        ("stdlib::much", "weight 'much' is not a number"),
    ],
)
def test_a_bad_mixture_is_refused_naming_the_key(tmp_path, spec, message):
    with pytest.raises(config_schema.ConfigValueError, match=f"data.mixture=.*{message}"):
        _config(tmp_path, spec)
    assert [e.name for e in parse_mixture("stdlib::2;parquet:/d/*.parquet:1")] == [
        "0_stdlib",
        "1_parquet",
    ]


@pytest.mark.parametrize("num_shards", [1, 2])
def test_tokens_per_source_are_global_whatever_the_process_count(
    tmp_path, mixture, monkeypatch, num_shards
):
    """Two processes (rows 0-3 and 4-7; with one virtual shard both build it) report, summed,
    one process's figures; their checkpoint files merge into one process's counts."""
    import train.data.input as input_lib  # noqa: PLC0415
    from train.data import mixture as mixture_lib  # noqa: PLC0415
    from train.data.iterator import merge_states  # noqa: PLC0415

    config = _config(tmp_path, mixture)
    config.data.num_shards = num_shards
    config_schema.validate(config)

    def pipeline_of(rows):
        monkeypatch.setattr(input_lib.distributed, "process_batch_slice", lambda m, b: rows)
        return _pipeline(config).iterator

    one = pipeline_of(slice(0, 8))
    procs = [pipeline_of(slice(0, 4)), pipeline_of(slice(4, 8))]
    for _ in range(6):
        whole = next(one)
        halves = [next(p) for p in procs]
        np.testing.assert_array_equal(
            whole["tokens"], np.concatenate([h["tokens"] for h in halves])
        )
    local = [p.source_counts.local_tokens() for p in procs]
    np.testing.assert_array_equal(local[0] + local[1], one.source_counts.local_tokens())
    assert one.source_metrics() == {
        f"source_tokens/{n}": int(t)
        for n, t in zip(["0_jsonl", "1_text"], one.source_counts.local_tokens(), strict=True)
    }

    files = {(i, 2): p.get_state().decode() for i, p in enumerate(procs)}
    resumed = pipeline_of(slice(0, 8))
    resumed.set_state(merge_states(files, (0, 1)))
    assert resumed.source_metrics() == one.source_metrics()

    # the sum over processes: int64 counts through int32 digits, exact past 2^31
    big = np.asarray([3 * 2**31 + 5, 7], np.int64)
    monkeypatch.setattr(mixture_lib.jax, "process_count", lambda: 2)
    gather = lambda x: np.stack([x, x])  # noqa: E731 - both processes hold `big`
    monkeypatch.setattr(mixture_lib.multihost_utils, "process_allgather", gather)
    np.testing.assert_array_equal(mixture_lib.process_sum(big), 2 * big)
