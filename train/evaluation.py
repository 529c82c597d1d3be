"""Held-out evaluation during pretraining: fixed batches, one jitted loss pass, no gradient.

    evaluator = make_evaluator(config, prepared, mesh, model_cfg, runtime, param_shardings)
    result = evaluator(params)      # EvalResult(loss, mtp_loss, tokens, seconds)

Data (text kinds): `data.eval_path` (globs of the same kind as `data.path`), or the documents of
`data.path` that data/split.py holds out (`data.eval_fraction`, by a hash of each document's
bytes; the training pipeline drops exactly those). The documents are read in one fixed order
(a shuffle with the constant seed `EVAL_SEED`, not `train.seed`), tokenized, packed like training
(concat-then-split) and cut into `train.eval_batches * train.grad_accum` batches of
`train.batch_size / train.grad_accum` rows (one micro-batch of the step: the same memory). They
are built once, on every process alike, before the first step: the same batches at every
evaluation, after a resume and in every run of a sweep with the same data, tokenizer and
`train.seq_len` / `train.batch_size`. Each process puts on its devices only the rows they hold.

    eval_loss     = sum over batches of CE_sum / sum of targets  (next token, `step.micro_losses`)
    eval_mtp_loss = the same for the MTP head (token t+2), when the model has one

The pass is `step.micro_losses` jitted with the parameters' shardings and the batch sharded over
the batch axes like the step's, outputs replicated: one compile, no gradient. Its wall time is
returned (the loop leaves it out of tokens/s). `due(step)`: every `train.eval_every` steps and
at the last step (`train.steps`).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

import qwen35_jax
from qwen35_jax import distributed, sharding
from train import config_schema, losses
from train.data.iterator import DataIterator
from train.data.pipeline import TokenizeRecord
from train.data.sources import open_source
from train.data.split import SplitSide
from train.prepare import PreparedData
from train.state import batch_shardings
from train.step import micro_losses

EVAL_SEED = 20260101  # the evaluation documents' order: the same in every run
Batch = dict[str, np.ndarray]


class EvalResult(NamedTuple):
    loss: float  # mean next-token cross-entropy over the held-out targets (nats/token)
    mtp_loss: float | None  # the MTP head's, when the model has one
    tokens: int  # next-token targets evaluated
    seconds: float  # wall time of the pass (host + device)

    def row(self) -> dict[str, float]:
        """The metrics.jsonl / TensorBoard fields of this evaluation."""
        out = {"eval_loss": self.loss, "eval_tokens": self.tokens, "eval_seconds": self.seconds}
        if self.mtp_loss is not None:
            out["eval_mtp_loss"] = self.mtp_loss
        return out


def wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for held-out evaluation."""
    return bool(config.data.eval_path or config.data.eval_fraction)


def due(step: int, train: ml_collections.ConfigDict) -> bool:
    """Evaluate after `step`: every `eval_every` steps, and at the last step."""
    return step == train.steps or bool(train.eval_every and step % train.eval_every == 0)


def eval_source(config: ml_collections.ConfigDict, prepared: PreparedData) -> tuple[Any, Any]:
    """(record source, record predicate or None) of the evaluation documents."""
    d = config.data
    if d.eval_path:
        try:
            source = open_source(d.kind, d.eval_path, max_bytes=d.max_bytes, text_key=d.text_key)
            return source, None
        except (FileNotFoundError, ValueError) as e:
            message = str(e).replace("data.path=", "data.eval_path=")
            raise config_schema.ConfigValueError(message) from None
    return prepared.source, SplitSide(d.eval_fraction, held_out=True)


def eval_batches(config: ml_collections.ConfigDict, prepared: PreparedData) -> list[Batch]:
    """The fixed evaluation batches (global, numpy): tokens, segment_ids, positions [rows, T]."""
    t = config.train
    rows, count = t.batch_size // t.grad_accum, t.eval_batches * t.grad_accum
    source, select = eval_source(config, prepared)
    encode = TokenizeRecord(prepared.decode, prepared.tokenizer, select)
    docs = grain.MapDataset.source(source).shuffle(seed=EVAL_SEED).map(encode)
    docs = docs.filter(lambda ex: len(ex["tokens"]) > 0).to_iter_dataset()
    packed = ConcatThenSplitIterDataset(docs, length_struct={"tokens": t.seq_len})
    iterator = DataIterator(packed.batch(rows, drop_remainder=True), encode)
    batches = []
    for batch in iterator:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        key = "data.eval_path" if config.data.eval_path else "data.eval_fraction"
        raise config_schema.ConfigValueError(
            f"{key}={config_schema.get_key(config, key)!r}: the evaluation documents fill no "
            f"batch of {rows} rows x train.seq_len={t.seq_len} tokens ({encode.records} records "
            f"read, {encode.skipped} unusable, {encode.held_out} not held out)"
        )
    return batches


def eval_sums_fn(
    model_cfg: qwen35_jax.Qwen35Config,
    runtime: qwen35_jax.Runtime,
    loss_chunk: int = 0,
    loss_row_groups: int = 1,
):
    """(params, batch) -> [CE_sum, targets, MTP CE_sum, MTP targets] (float32 [4])."""
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0

    def sums(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        n_main, n_mtp = losses.target_counts(batch["segment_ids"], with_mtp)
        _, s = micro_losses(
            model_cfg,
            params,
            batch,
            mtp_lambda=1.0 if with_mtp else 0.0,
            z_loss=0.0,
            n_main=n_main,
            n_mtp=n_mtp,
            num_micro=1,
            loss_chunk=loss_chunk,
            runtime=runtime,
            loss_row_groups=loss_row_groups,
        )
        zero = jnp.zeros((), jnp.float32)
        return jnp.stack([s["ce"], n_main, s.get("mtp", zero), n_mtp]).astype(jnp.float32)

    return sums


class Evaluator:
    """The fixed batches on the devices and the jitted loss pass (module docstring)."""

    def __init__(
        self,
        batches: list[Batch],
        mesh: jax.sharding.Mesh,
        model_cfg: qwen35_jax.Qwen35Config,
        runtime: qwen35_jax.Runtime,
        param_shardings: Any,
        loss_chunk: int = 0,
    ):
        self.host_batches = batches
        rows_global = batches[0]["tokens"].shape[0]
        shapes = {k: v.shape for k, v in batches[0].items()}
        shardings = batch_shardings(mesh, shapes)
        rows = distributed.process_batch_slice(mesh, rows_global)
        self._batches = [
            {
                k: jax.make_array_from_process_local_data(shardings[k], v[rows], shapes[k])
                for k, v in b.items()
            }
            for b in batches
        ]
        self.with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0
        shards = int(np.prod([mesh.shape[a] for a in _batch_axes(mesh, rows_global)]))
        groups = rows_global // shards if rows_global % shards == 0 else 1
        self._fn = jax.jit(
            eval_sums_fn(model_cfg, runtime, loss_chunk, groups),
            in_shardings=(param_shardings, shardings),
            out_shardings=None,
        )

    def __call__(self, params: Any) -> EvalResult:
        jax.block_until_ready(params)  # the step that made them is training time, not ours
        t0 = time.perf_counter()
        total = np.zeros(4, np.float64)
        for batch in self._batches:
            total += np.asarray(jax.device_get(self._fn(params, batch)), np.float64)
        ce, n, mtp, n_mtp = total
        return EvalResult(
            loss=float(ce / max(n, 1.0)),
            mtp_loss=float(mtp / max(n_mtp, 1.0)) if self.with_mtp else None,
            tokens=int(n),
            seconds=time.perf_counter() - t0,
        )


def _batch_axes(mesh: jax.sharding.Mesh, rows: int) -> list[str]:
    (entry,) = sharding.logical_spec(("batch",), (rows,), dict(mesh.shape)) or (None,)
    return [] if entry is None else np.atleast_1d(entry).tolist()


def make_evaluator(
    config: ml_collections.ConfigDict,
    prepared: PreparedData,
    mesh: jax.sharding.Mesh,
    model_cfg: qwen35_jax.Qwen35Config,
    runtime: qwen35_jax.Runtime,
    param_shardings: Any,
) -> Evaluator | None:
    """The run's evaluator, or None when the config asks for no held-out evaluation."""
    if not wanted(config):
        return None
    batches = eval_batches(config, prepared)
    return Evaluator(batches, mesh, model_cfg, runtime, param_shardings, config.train.loss_chunk)
