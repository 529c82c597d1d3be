"""Held-out evaluation (train/evaluation.py, train/data/split.py): the split never overlaps the
training stream, the batches are fixed (seed, shards, runs, resume), and the evaluated loss is
`qwen35_jax.apply`'s cross-entropy on those batches (numpy, float32)."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import qwen35_jax
from qwen35_jax import mesh as mesh_lib
from train import config_schema, evaluation
from train.data.pipeline import TokenizeRecord, build_dataset
from train.data.split import SplitSide, is_held_out, unit_hash
from train.data.stdlib import stdlib_files
from train.prepare import prepare_data
from train.tokenizer import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTION = 0.2


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    texts = (Path(f).read_text(errors="replace") for f in stdlib_files(max_bytes=200_000))
    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    return train_sentencepiece(texts, path, 384)


def _config(tokenizer_path: str, **overrides):
    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny_cpu.py"))["get_config"]()
    config.data.tokenizer_path = tokenizer_path
    config.data.eval_fraction = FRACTION
    config.train.batch_size = 8
    config.train.seq_len = 32
    config.train.eval_batches = 2
    config.train.completion_tokens = 0
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    config_schema.validate(config)
    return config


class Spy:
    """A decode that remembers the raw records it was asked to decode."""

    def __init__(self, decode):
        self.decode, self.seen = decode, []

    def __call__(self, raw):
        self.seen.append(raw)
        return self.decode(raw)


def test_the_held_out_documents_are_never_trained_on(tmp_path, tokenizer_path):
    config = _config(tokenizer_path)
    prepared = prepare_data(config, str(tmp_path))
    records = [prepared.source[i] for i in range(len(prepared.source))]
    held = [r for r in records if is_held_out(r, FRACTION)]
    assert 0 < len(held) < len(records)
    assert all(SplitSide(FRACTION, True)(r) != SplitSide(FRACTION, False)(r) for r in records)
    assert unit_hash(b"abc") == unit_hash(b"abc") != unit_hash(b"abd")

    # the training stream (2 virtual shards, 3 epochs' worth of batches) decodes no held-out one
    train_spy = Spy(prepared.decode)
    encode = TokenizeRecord(train_spy, prepared.tokenizer, SplitSide(FRACTION, False))
    for shard in range(2):
        ds = build_dataset(
            prepared.source,
            encode,
            seq_len=32,
            rows_per_shard=4,
            seed=0,
            shard_index=shard,
            shard_count=2,
        )
        it = iter(ds)
        for _ in range(40):
            next(it)
    assert train_spy.seen and not any(is_held_out(r, FRACTION) for r in train_spy.seen)
    assert encode.held_out > 0

    # the evaluation batches are made of held-out documents only
    eval_spy = Spy(prepared.decode)
    prepared.decode = eval_spy
    batches = evaluation.eval_batches(config, prepared)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (8, 32)
    assert eval_spy.seen and all(is_held_out(r, FRACTION) for r in eval_spy.seen)


def test_the_evaluation_batches_are_the_same_whatever_the_seed_and_shards(tmp_path, tokenizer_path):
    a = _config(tokenizer_path)
    b = _config(tokenizer_path, train__seed=7, data__num_shards=2)
    batches_a = evaluation.eval_batches(a, prepare_data(a, str(tmp_path)))
    batches_b = evaluation.eval_batches(b, prepare_data(b, str(tmp_path)))
    for x, y in zip(batches_a, batches_b, strict=True):
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(x[key], y[key])


def _cross_entropy(logits_BTV, tokens_BT, seg_BT, offset):
    """Sum of -log p(token t+offset) over positions whose target is in the same document."""
    logits = np.asarray(logits_BTV, np.float64)[:, :-offset]
    targets, seg = tokens_BT[:, offset:], seg_BT[:, offset:]
    valid = (seg_BT[:, :-offset] == seg) & (seg != 0)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((lse - picked) * valid).sum()), float(valid.sum())


def test_eval_loss_is_the_cross_entropy_of_apply_on_those_batches(tmp_path, tokenizer_path):
    config = _config(tokenizer_path)
    prepared = prepare_data(config, str(tmp_path))
    model_cfg = config_schema.model_config(config)
    runtime = config_schema.runtime_config(config)
    mesh = mesh_lib.mesh_from_config(config.mesh)  # 8 devices: the rows split 8 ways
    params = qwen35_jax.init_params(model_cfg, jax.random.key(3), runtime=runtime)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    params = jax.device_put(params, replicated)
    batches = evaluation.eval_batches(config, prepared)
    evaluator = evaluation.Evaluator(batches, mesh, model_cfg, runtime, replicated)
    result = evaluator(params)

    forward = jax.jit(
        lambda p, tokens, seg, pos: qwen35_jax.apply(
            model_cfg, p, tokens, segment_ids=seg, positions=pos, return_mtp=True, runtime=runtime
        )
    )
    sums = np.zeros(4)
    for b in batches:
        out = forward(params, b["tokens"], b["segment_ids"], b["positions"])
        sums[:2] += _cross_entropy(out.logits, b["tokens"], b["segment_ids"], 1)
        sums[2:] += _cross_entropy(out.mtp_logits, b["tokens"], b["segment_ids"], 2)
    assert result.tokens == int(sums[1])
    np.testing.assert_allclose(result.loss, sums[0] / sums[1], rtol=2e-5)
    np.testing.assert_allclose(result.mtp_loss, sums[2] / sums[3], rtol=2e-5)
    assert result.seconds > 0


@pytest.mark.slow
def test_a_resumed_run_evaluates_the_same_batches_as_an_uninterrupted_one(tmp_path, tokenizer_path):
    from train import loop  # noqa: PLC0415

    def run(workdir, **overrides):
        config = _config(
            tokenizer_path,
            train__steps=4,
            train__eval_every=2,
            train__log_every=1,
            checkpoint__every_steps=2,
            **overrides,
        )
        return loop.run(config, str(workdir))

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "cut", train__run_steps=2)["step"] == 2
    resumed = run(tmp_path / "cut")
    assert whole["final_eval_loss"] == resumed["final_eval_loss"]

    def evals(workdir):
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}

    assert evals(tmp_path / "whole") == evals(tmp_path / "cut")
    assert sorted(evals(tmp_path / "whole")) == [2, 4]
    summary = json.loads((tmp_path / "whole" / "run_summary.json").read_text())
    assert summary["final_eval_loss"] == whole["final_eval_loss"] and summary["parameters"] > 0


def test_eval_settings_are_checked():
    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny_cpu.py"))["get_config"]()
    config.train.eval_every = 10
    with pytest.raises(config_schema.ConfigValueError, match="train.eval_every=10 needs"):
        config_schema.validate(config)
    config.data.eval_fraction = 1.0
    with pytest.raises(config_schema.ConfigValueError, match=r"data.eval_fraction=1.0 must be"):
        config_schema.validate(config)


def test_the_trained_tokenizer_never_sees_a_held_out_document_and_stats_count_them_apart(
    tmp_path, monkeypatch
):
    import train.prepare as prepare  # noqa: PLC0415

    seen = []

    def spy(texts, path, vocab_size):
        seen.extend(texts)
        return train_sentencepiece(seen, path, vocab_size)

    monkeypatch.setattr(prepare, "train_sentencepiece", spy)
    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny_cpu.py"))["get_config"]()
    config.data.max_bytes = 200_000
    config.data.eval_fraction = FRACTION
    config_schema.validate(config)
    prepared = prepare_data(config, str(tmp_path))
    records = [prepared.source[i] for i in range(len(prepared.source))]
    texts = [prepared.decode(r) for r in records]
    held = [t for r, t in zip(records, texts, strict=True) if is_held_out(r, FRACTION) and t]
    kept = [t for r, t in zip(records, texts, strict=True) if not is_held_out(r, FRACTION) and t]
    assert held and kept
    assert sorted(seen) == sorted(kept)  # every training document, no held-out one

    stats = json.loads((tmp_path / "data_stats.json").read_text())
    tok = prepared.tokenizer
    assert stats["eval_documents"] == len(held)
    assert stats["eval_tokens"] == sum(len(tok.encode(t)) + 1 for t in held)
    assert stats["documents_read"] == len(kept)
    assert stats["tokens"] == sum(len(tok.encode(t)) + 1 for t in kept)
    assert "held out for evaluation" in prepare.describe(stats)
