"""The training loop: prepare, build or restore the state, step, log, checkpoint, complete.

    run(config, workdir)
      prepare data (source, tokenizer, unigram entropy)     prepare.py
      model config (+ weights from init.from_hf)            config_schema.py, qwen35_jax.load_hf
      mesh, abstract state and shardings                    state.py
      restore the latest complete checkpoint, or init       checkpointing.py
      for each step: next batch -> train_step (jitted, donating the state); the previous step's
        metrics are read now (one step late, so the host never waits for the device); NaN/Inf
        policy; log every `log_every`; save every `checkpoint.every_steps`; SIGTERM -> save, exit
      save at the end, print greedy completions (multimodal digits: the held-out accuracy)

The data iterator is advanced exactly once per step before the step runs, so a checkpoint
written after step s holds the iterator positioned at batch s: resume repeats and skips nothing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import qwen35_jax
from qwen35_jax import sharding
from qwen35_jax.convert import orbax_io
from train import caption_eval, config_schema, flops
from train.checkpointing import Checkpointer, PreemptionGuard, restore_params
from train.data.multimodal import (
    MULTIMODAL_FIELDS,
    VisualSpec,
    batch_shapes,
    build_multimodal_dataset,
)
from train.data.pipeline import DataIterator, TokenizeRecord, build_dataset, shards_for_rows
from train.metrics import MetricsLogger
from train.optimizer import make_optimizer
from train.prepare import PreparedData, multimodal_encoder, prepare_data
from train.sampling import greedy_complete
from train.state import abstract_state, batch_shardings, check_params_match, init_state
from train.step import make_train_step


class NonFiniteLossError(RuntimeError):
    """nan_policy="stop" met a NaN/Inf loss or gradient; the last checkpoint is intact."""


def _say(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _model_and_params(
    config: ml_collections.ConfigDict,
) -> tuple[qwen35_jax.Qwen35Config, qwen35_jax.Runtime, Any]:
    """The model config, the runtime, and initial params when they come from a Hugging Face
    checkpoint.

    With `init.from_hf` or a converted `init.from_checkpoint` (`hf-to-orbax` output) the
    checkpoint's config.json replaces `model` (the architecture); `runtime` is always the
    config's own.
    """
    runtime = config_schema.runtime_config(config)
    if config.init.from_hf:
        hf_cfg = qwen35_jax.Qwen35Config.from_hf(config.init.from_hf)
        _check_fits_host_memory(config.init.from_hf, hf_cfg)
        _, params = qwen35_jax.load_hf(config.init.from_hf, jnp.float32, config=hf_cfg)
        return hf_cfg, runtime, params
    ckpt = config.init.from_checkpoint
    if ckpt and orbax_io.is_converted_checkpoint(ckpt):
        return qwen35_jax.Qwen35Config.from_hf(ckpt), runtime, None
    return config_schema.model_config(config), runtime, None


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_fits_host_memory(hf_dir: str, hf_cfg: qwen35_jax.Qwen35Config) -> None:
    """`init.from_hf` reads every weight into this host's memory as float32 (then shards it):
    refuse before reading when that cannot fit, pointing to the streaming converter."""
    shapes = jax.tree.leaves(qwen35_jax.abstract_params(hf_cfg))
    need = sum(4 * int(np.prod(s.shape)) for s in shapes)
    have = available_host_bytes()
    if have is not None and need > 0.8 * have:
        raise config_schema.ConfigValueError(
            f"init.from_hf={hf_dir!r}: loading it needs {need / 2**30:.1f} GiB of host memory "
            f"(float32 weights), this host has {have / 2**30:.1f} GiB available. Convert it "
            "once with `python -m qwen35_jax.convert hf-to-orbax --hf_dir DIR --out CKPT "
            "[--mesh ...]` and pass --config.init.from_checkpoint=CKPT instead (restored "
            "shard by shard, straight into each device's layout)."
        )


def _batch_shapes(
    config: ml_collections.ConfigDict, model_cfg: qwen35_jax.Qwen35Config
) -> dict[str, tuple[int, ...]]:
    """Global shape per batch key: [B, T] text arrays; multimodal adds loss_mask and pixels."""
    t = config.train
    if config.data.kind in config_schema.MULTIMODAL_KINDS:
        d = config.data
        patch_dim = VisualSpec.of(model_cfg).patch_dim
        return batch_shapes(t.batch_size, t.seq_len, d.patches_per_row, d.images_per_row, patch_dim)
    return {k: (t.batch_size, t.seq_len) for k in ("tokens", "segment_ids", "positions")}


def _global_batch(
    host_batch: dict[str, np.ndarray], shardings: dict[str, Any], shapes: dict[str, tuple]
) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, shapes[k])
        for k, v in host_batch.items()
    }


def make_data_iterator(
    config: ml_collections.ConfigDict,
    prepared: PreparedData,
    mesh: jax.sharding.Mesh,
    model_cfg: qwen35_jax.Qwen35Config | None = None,
) -> DataIterator:
    """This host's iterator of packed batches: the data shards behind the rows it holds
    (multimodal kinds need `model_cfg` for the special token ids and the patch geometry)."""
    t = config.train
    num_shards = config.data.num_shards or jax.process_count()
    rows = sharding.process_batch_slice(mesh, t.batch_size)
    try:
        shards = shards_for_rows(rows, t.batch_size, num_shards)
    except ValueError as e:
        raise config_schema.ConfigValueError(str(e)) from None
    if config.data.kind in config_schema.MULTIMODAL_KINDS:
        spec = VisualSpec.of(model_cfg or config_schema.model_config(config))
        encode = multimodal_encoder(config, prepared.tokenizer, spec)
        datasets = [
            build_multimodal_dataset(
                prepared.source,
                encode,
                seq_len=t.seq_len,
                patches_per_row=config.data.patches_per_row,
                images_per_row=config.data.images_per_row,
                rows_per_shard=t.batch_size // num_shards,
                seed=t.seed,
                shard_index=i,
                shard_count=num_shards,
                read_threads=config.data.read_threads,
            )
            for i in shards
        ]
        return DataIterator(datasets, encode, MULTIMODAL_FIELDS)
    tokenize = TokenizeRecord(prepared.decode, prepared.tokenizer)
    datasets = [
        build_dataset(
            prepared.source,
            tokenize,
            seq_len=t.seq_len,
            rows_per_shard=t.batch_size // num_shards,
            seed=t.seed,
            shard_index=i,
            shard_count=num_shards,
            read_threads=config.data.read_threads,
        )
        for i in shards
    ]
    return DataIterator(datasets, tokenize)


def _initial_params(config, hf_params, abstract, shardings):
    """Parameters of `init.*` (fresh optimizer and step), or None for a random init."""
    if hf_params is not None:
        check_params_match(hf_params, abstract.params, f"init.from_hf={config.init.from_hf!r}")
        return hf_params
    ckpt = config.init.from_checkpoint
    if ckpt and orbax_io.is_converted_checkpoint(ckpt):
        params = orbax_io.restore_params(ckpt, shardings.params)[1]
        check_params_match(params, abstract.params, f"init.from_checkpoint={ckpt!r}")
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract.params)
    if ckpt:
        return restore_params(ckpt, abstract.params)
    return None


def _completions(config, model_cfg, runtime, params, tokenizer) -> list[tuple[str, str]]:
    prompts = [p for p in config.train.prompts if p]
    if not prompts or config.train.completion_tokens == 0:
        return []
    ids = [tokenizer.encode(p) for p in prompts]
    outs = greedy_complete(
        model_cfg,
        params,
        ids,
        config.train.completion_tokens,
        stop_id=tokenizer.eos_id,
        runtime=runtime,
    )
    return [(p, tokenizer.decode(o)) for p, o in zip(prompts, outs, strict=True)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

    SIGTERM is caught from the start (data preparation, compilation): the run then stops after
    its first step, saving a checkpoint.
    """
    with PreemptionGuard() as guard:
        return _run(config, workdir, guard)


def _run(config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard) -> dict[str, Any]:
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    prepared = prepare_data(config, workdir)
    stats = prepared.stats
    _say(
        f"data: {stats['records']} records, {stats['tokens']:,} tokens sampled; unigram entropy "
        f"{stats['unigram_entropy_nats']:.3f} nats/token ({stats['unigram_entropy_bits']:.2f} "
        "bits)"
        + (
            f"; {stats['images']:,} images, {stats['patches']:,} patches"
            if "images" in stats
            else ""
        )
    )
    model_cfg, runtime, hf_params = _model_and_params(config)
    vocab = model_cfg.text_config.vocab_size
    if prepared.tokenizer.vocab_size > vocab:
        raise config_schema.ConfigValueError(
            f"model.text_config.vocab_size={vocab} is smaller than the tokenizer's "
            f"{prepared.tokenizer.vocab_size} pieces"
        )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_schema.resolved_json(config, model_cfg))

    mesh = sharding.mesh_from_config(config.mesh)
    tx, schedule = make_optimizer(config.optimizer, t.steps)
    abstract, shardings = abstract_state(model_cfg, tx, mesh, runtime=runtime)
    data_iter = make_data_iterator(config, prepared, mesh, model_cfg)
    ckpt = Checkpointer(
        os.path.join(workdir, config.checkpoint.dir),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    restored = ckpt.restore_latest(abstract, data_iter)
    if restored is not None:
        state, start = restored
        _say(f"resumed from checkpoint step {start} in {ckpt.directory}")
    else:
        params = _initial_params(config, hf_params, abstract, shardings)
        rng = jax.random.key(t.seed)
        state, start = init_state(model_cfg, tx, mesh, rng, params, runtime=runtime), 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    _say(f"model: {n_params:,} parameters, {len(jax.devices())} device(s), mesh {dict(mesh.shape)}")

    shape = (t.batch_size, t.seq_len)
    shapes = _batch_shapes(config, model_cfg)
    batch_sh = batch_shardings(mesh, shapes)
    step_fn = jax.jit(
        make_train_step(model_cfg, tx, schedule, t, runtime=runtime),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0 and t.mtp_lambda > 0
    per_token = flops.train_flops_per_token(model_cfg, t.seq_len, with_mtp, runtime=runtime)
    flops_per_step = per_token * np.prod(shape)
    peak = t.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device()
    logger = MetricsLogger(
        workdir,
        total_steps=t.steps,
        tokens_per_step=int(np.prod(shape)),
        flops_per_step=float(flops_per_step),
        peak_flops=peak * jax.device_count() if peak else None,
        enabled=jax.process_index() == 0,
    )

    rows: list[dict[str, Any]] = []
    stop_at = min(t.steps, start + t.run_steps) if t.run_steps else t.steps
    step, pending, preempted = start, None, False
    t0 = time.perf_counter()

    window: list[float] = []  # main losses of the steps since the last logged one

    def drain(item) -> None:
        """Reads a finished step's metrics (one step late) and applies the NaN policy."""
        done_step, metrics = item
        loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
        if finite:
            window.append(float(loss))
        if done_step % t.log_every and done_step != stop_at and finite:
            return
        host = jax.device_get(metrics)
        extra = {"loss_last": float(host["loss"]), "data_skipped": data_iter.skipped}
        if window:
            host["loss"] = np.mean(window)  # the mean over the logging interval
        window.clear()
        rows.append(logger.log(done_step, host, extra))
        if not finite:
            _say(
                f"step {done_step}: non-finite loss or gradient; update skipped "
                f"({int(host['skipped'])} so far)"
            )
            if t.nan_policy == "stop":
                ckpt.close()
                raise NonFiniteLossError(
                    f"step {done_step}: loss or gradient is NaN/Inf (train.nan_policy='stop'); "
                    f"stopping without saving; the last checkpoint ({ckpt.latest_step()}) is "
                    "intact"
                )

    with jax.set_mesh(mesh), sharding.axis_rules():
        while step < stop_at:
            batch = _global_batch(next(data_iter), batch_sh, shapes)
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                drain(pending)
            pending = (step, metrics)
            if step % config.checkpoint.every_steps == 0:
                ckpt.save(step, state, data_iter)
            if ckpt.preemption_reached(step, guard.requested):
                preempted = True
                break
        if pending is not None:
            drain(pending)
    ckpt.save(step, state, data_iter)
    ckpt.close()
    logger.close()
    elapsed = time.perf_counter() - t0
    summary = {
        "start_step": start,
        "step": step,
        "preempted": preempted,
        "rows": rows,
        "train_seconds": elapsed,
        "unigram_entropy": stats["unigram_entropy_nats"],
    }
    if preempted:
        _say(f"preempted: checkpoint saved at step {step}; rerun the same command to resume")
        return summary
    if step < t.steps:
        _say(f"stopped after train.run_steps={t.run_steps}: checkpoint saved at step {step}")
        return summary
    if rows:
        summary["final_loss"] = float(rows[-1]["loss"])  # mean over the last logging interval
        _say(
            f"done: {step} steps in {elapsed:.0f}s; final loss {summary['final_loss']:.3f} "
            f"nats/token vs unigram entropy {stats['unigram_entropy_nats']:.3f}"
        )
    if jax.process_index() == 0:
        with jax.set_mesh(mesh), sharding.axis_rules():
            completions = _completions(config, model_cfg, runtime, state.params, prepared.tokenizer)
        summary["completions"] = completions
        if completions:
            _say("greedy completions:")
            for prompt, text in completions:
                _say(f"  {prompt!r} -> {prompt + text!r}")
        if config.data.kind == "digits" and config.data.eval_examples:
            with jax.set_mesh(mesh), sharding.axis_rules():
                result = caption_eval.digits_eval(
                    model_cfg,
                    state.params,
                    prepared.tokenizer,
                    image_size=config.data.image_size,
                    count=config.data.eval_examples,
                    max_patches=config.data.patches_per_row,
                    runtime=runtime,
                )
            summary["eval"] = result
            _say(caption_eval.describe(result))
    return summary
