"""Held-out evaluation during pretraining: fixed batches, one jitted loss pass, no gradient.

    evaluator = make_evaluator(config, prepared, mesh, model_cfg, runtime, param_shardings)
    result = evaluator(params)      # EvalResult(loss, mtp_loss, tokens, seconds, accuracy, ...)

Data (prepare.py: `eval_documents`): `data.eval_path` (globs of the same kind as `data.path`),
or the documents of `data.path` that data/split.py holds out (`data.eval_fraction`, by a hash of
each document's bytes; the training pipeline drops exactly those); for `data.kind="digits"` its
own held-out images (data/digits.py), asked for by `train.eval_every`. The documents are read in
one fixed order (a shuffle with the constant seed `EVAL_SEED`, not `train.seed`), encoded and
packed like training (text: concat-then-split, `pipeline.pack_rows`; multimodal kinds: first-fit
with the patch budget, `multimodal.pack_documents`), and cut into `train.eval_batches *
train.grad_accum` batches of `train.batch_size / train.grad_accum` rows (one micro-batch of the
step: the same memory). They are built once, on every process alike, before the first step:
the same batches at every evaluation, after a resume and in every run of a sweep with the same
data, tokenizer and `train.seq_len` / `train.batch_size`. Each process puts on its devices only
the rows they hold.

    eval_loss     = sum over batches of CE_sum / sum of targets  (next token, `step.micro_losses`)
    eval_mtp_loss = the same for the MTP head (token t+2), when the model has one

Multimodal kinds (image-caption data) evaluate the text targets only (`loss_mask`) and add
`eval_accuracy`, the share of held-out documents whose caption comes out exactly, teacher-forced
(every text token is the model's argmax; caption_eval.py: `caption_sums_fn`, the same pass), and
`eval_documents`, their number.

The pass is jitted with the parameters' shardings and the batch sharded over the batch axes
like the step's, outputs replicated: one compile, no gradient. Its wall time is returned (the
loop leaves it out of tokens/s). `due(step)`: every `train.eval_every` steps and at the last step
(`train.steps`).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import qwen35_jax
from qwen35_jax import distributed, sharding
from train import config_schema, losses
from train.caption_eval import caption_sums_fn
from train.data.iterator import DataIterator
from train.data.multimodal import MULTIMODAL_FIELDS, VisualSpec, pack_documents
from train.data.pipeline import TokenizeRecord, pack_rows
from train.prepare import PreparedData, eval_wanted, multimodal_encoder
from train.state import batch_shardings
from train.step import micro_losses

EVAL_SEED = 20260101  # the evaluation documents' order: the same in every run
Batch = dict[str, np.ndarray]


class EvalResult(NamedTuple):
    loss: float  # mean next-token cross-entropy over the held-out targets (nats/token)
    mtp_loss: float | None  # the MTP head's, when the model has one
    tokens: int  # next-token targets evaluated
    seconds: float  # wall time of the pass (host + device)
    accuracy: float | None = None  # multimodal kinds: documents whose caption is exact
    documents: int | None = None  # multimodal kinds: documents evaluated

    def row(self) -> dict[str, float]:
        """The metrics.jsonl / TensorBoard fields of this evaluation."""
        out = {"eval_loss": self.loss, "eval_tokens": self.tokens, "eval_seconds": self.seconds}
        if self.mtp_loss is not None:
            out["eval_mtp_loss"] = self.mtp_loss
        if self.accuracy is not None:
            out["eval_accuracy"] = self.accuracy
            out["eval_documents"] = self.documents
        return out


def wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for held-out evaluation."""
    return eval_wanted(config)


def due(step: int, train: ml_collections.ConfigDict) -> bool:
    """Evaluate after `step`: every `eval_every` steps, and at the last step."""
    return step == train.steps or bool(train.eval_every and step % train.eval_every == 0)


def eval_batches(
    config: ml_collections.ConfigDict,
    prepared: PreparedData,
    model_cfg: qwen35_jax.Qwen35Config | None = None,
) -> list[Batch]:
    """The fixed evaluation batches (global, numpy): text kinds tokens, segment_ids, positions
    [rows, T]; multimodal kinds as training's (multimodal.py), patch geometry from `model_cfg`
    (default `config.model`)."""
    t, held = config.train, prepared.eval
    if held is None:
        raise ValueError("the config asks for no held-out evaluation")
    rows, count = t.batch_size // t.grad_accum, t.eval_batches * t.grad_accum
    multimodal = config.data.kind in config_schema.MULTIMODAL_KINDS
    if multimodal:
        spec = VisualSpec.of(model_cfg or config_schema.model_config(config))
        encode = multimodal_encoder(config, prepared.tokenizer, spec, held.select)
    else:
        encode = TokenizeRecord(prepared.decode, prepared.tokenizer, held.select)
    docs = grain.MapDataset.source(held.source).shuffle(seed=EVAL_SEED).map(encode)
    docs = docs.filter(lambda ex: len(ex["tokens"]) > 0).to_iter_dataset()
    if multimodal:
        d = config.data
        budget = dict(patches_per_row=d.patches_per_row, images_per_row=d.images_per_row)
        packed = pack_documents(docs, seq_len=t.seq_len, rows=rows, seed=EVAL_SEED, **budget)
        iterator = DataIterator(packed, encode, MULTIMODAL_FIELDS)
    else:
        iterator = DataIterator(pack_rows(docs, t.seq_len, rows), encode)
    batches = []
    for batch in iterator:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        raise config_schema.ConfigValueError(
            f"{held.key}={config_schema.get_key(config, held.key)!r}: the evaluation documents "
            f"fill no batch of {rows} rows x train.seq_len={t.seq_len} tokens ({encode.records} "
            f"records read, {encode.skipped} unusable, {encode.held_out} not held out)"
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
        self.captions = "loss_mask" in shapes  # multimodal: text targets, caption accuracy
        if self.captions:
            sums = caption_sums_fn(model_cfg, runtime, loss_chunk)
        else:
            shards = int(np.prod([mesh.shape[a] for a in _batch_axes(mesh, rows_global)]))
            groups = rows_global // shards if rows_global % shards == 0 else 1
            sums = eval_sums_fn(model_cfg, runtime, loss_chunk, groups)
        self._fn = jax.jit(sums, in_shardings=(param_shardings, shardings), out_shardings=None)

    def __call__(self, params: Any) -> EvalResult:
        jax.block_until_ready(params)  # the step that made them is training time, not ours
        t0 = time.perf_counter()
        total = 0.0
        for batch in self._batches:
            total = total + np.asarray(jax.device_get(self._fn(params, batch)), np.float64)
        ce, n, mtp, n_mtp = total[:4]
        docs, exact = total[4:] if self.captions else (None, None)
        return EvalResult(
            loss=float(ce / max(n, 1.0)),
            mtp_loss=float(mtp / max(n_mtp, 1.0)) if self.with_mtp else None,
            tokens=int(n),
            seconds=time.perf_counter() - t0,
            accuracy=float(exact / max(docs, 1.0)) if self.captions else None,
            documents=int(docs) if self.captions else None,
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
    batches = eval_batches(config, prepared, model_cfg)
    return Evaluator(batches, mesh, model_cfg, runtime, param_shardings, config.train.loss_chunk)
