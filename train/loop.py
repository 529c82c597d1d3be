"""The training loop: the story of a run, each part in the module it names.

    run(config, workdir)
      prepare data (source, tokenizer, unigram entropy)          prepare.py
      model config and initial parameters                        init.py
      mesh, optimizer, abstract state and shardings              qwen35_jax.mesh, state.py
      input pipeline (this process's rows, global batches)       data/input.py
      resume from the workdir's latest checkpoint, or init       checkpointing.py, state.py
      held-out evaluation batches, built once (when data.eval_* is set)  evaluation.py
      steps: next batch -> train_step (jitted, donating the state); the previous step's metrics
        are read now (one step late, so the host never waits for the device); NaN/Inf policy;
        log every `log_every`; evaluate every `eval_every` and at the last step (its row
        carries eval_loss; its time is left out of tokens/s); save every
        `checkpoint.every_steps`; before each step all processes agree to step or to stop
        (step_gate.py: SIGTERM or Ctrl-C to any process, also while an input is starved)
      save; end-of-run completions and evaluation (every process)  end_of_run.py

The data iterator is advanced exactly once per step before the step runs, so a checkpoint
written after step s holds the iterator positioned at batch s: resume repeats and skips nothing.
With several processes, an exception on one ends it at once (exit 1, no wait in a collective or
at the distributed shutdown), so the launcher can stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from qwen35_jax import mesh as mesh_lib
from qwen35_jax import sharding
from train import config_schema, end_of_run, evaluation, flops, init
from train.checkpointing import Checkpointer, PreemptionGuard
from train.data.input import InputPipeline, input_pipeline
from train.divergence import (
    DivergedError,
    DivergenceMonitor,
    NonFiniteLossError,
    cause,
    skipped_save_note,
)
from train.metrics import MetricsLogger
from train.optimizer import make_optimizer
from train.prepare import describe, prepare_data, write_atomic
from train.state import TrainState, abstract_state, init_state
from train.step import make_train_step
from train.step_gate import StepGate

__all__ = ["DivergedError", "NonFiniteLossError", "run"]


def _say(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

    SIGTERM and Ctrl-C are caught from the start (data preparation, compilation): the run then
    stops before its next step, saving a checkpoint.
    """
    try:
        with PreemptionGuard() as guard:
            return _run(config, workdir, guard)
    except BaseException as e:
        if jax.process_count() == 1 or isinstance(e, (SystemExit, KeyboardInterrupt)):
            raise
        if isinstance(e, (NonFiniteLossError, DivergedError, config_schema.ConfigValueError)):
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _run(config: ml_collections.ConfigDict, workdir: str, guard: PreemptionGuard) -> dict[str, Any]:
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    prepared = prepare_data(config, workdir)
    _say(describe(prepared.stats))
    model_cfg, runtime = init.model_config(config), config_schema.runtime_config(config)
    _check_vocab(model_cfg, prepared.tokenizer.vocab_size)

    mesh = mesh_lib.mesh_from_config(config.mesh)
    pipe = input_pipeline(config, prepared, mesh, model_cfg)
    setup = jitted_step(config, model_cfg, runtime, mesh, pipe.shardings)
    abstract = setup.abstract
    ckpt = Checkpointer(
        os.path.join(workdir, config.checkpoint.dir),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    restored = ckpt.restore_latest(abstract, pipe.iterator)  # the workdir's own run first
    if restored is not None:
        state, start = restored
        _say(f"resumed from checkpoint step {start} in {ckpt.directory}")
        if start >= t.steps:
            _say(f"already finished: step {start} of train.steps={t.steps}; nothing to train")
    else:
        params = init.initial_params(config, model_cfg, abstract.params)
        rng = jax.random.key(t.seed)
        state, start = init_state(model_cfg, setup.tx, mesh, rng, params, runtime=runtime), 0
    _write_resolved_config(config, model_cfg, workdir)  # after the restore: a refused run keeps it
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    _say(f"model: {n_params:,} parameters, {len(jax.devices())} device(s), mesh {dict(mesh.shape)}")

    step_fn = setup.fn
    evaluator = evaluation.make_evaluator(
        config, prepared, mesh, model_cfg, runtime, setup.shardings.params
    )
    logger = _metrics_logger(config, model_cfg, runtime, workdir, start)
    stop_at = min(t.steps, start + t.run_steps) if t.run_steps else t.steps
    monitor = DivergenceMonitor(t.nan_policy, t.max_skips_in_a_row)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
        state, step, rows, preempted = _steps(
            config, step_fn, state, pipe, ckpt, logger, start, stop_at, guard, monitor, evaluator
        )
    saved = monitor.can_save()  # never a checkpoint of a state every batch has failed on
    if saved:
        ckpt.save(step, state, pipe.position())
    kept = f"checkpoint saved at step {step}" if saved else skipped_save_note(ckpt.latest_step())
    ckpt.close()
    logger.close()
    elapsed = time.perf_counter() - t0
    summary = _summary(config, prepared.stats, start, step, rows, elapsed, preempted, kept)
    _write_run_summary(workdir, summary, n_params)
    if preempted or step < t.steps:
        return summary
    result = end_of_run.evaluate(config, model_cfg, runtime, state.params, prepared.tokenizer, mesh)
    summary["completions"] = result.completions
    if result.digits_eval is not None:
        summary["eval"] = result.digits_eval
    for line in end_of_run.report(result):
        _say(line)
    return summary


class StepSetup(NamedTuple):
    """The trainer's jitted step and what it is called with."""

    fn: Any  # jax.jit(train_step): (state, batch) -> (state, metrics), the state donated
    tx: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs carrying their NamedShardings
    shardings: TrainState


def jitted_step(
    config: ml_collections.ConfigDict,
    model_cfg: Any,
    runtime: Any,
    mesh: jax.sharding.Mesh,
    batch_shardings: dict[str, Any],
) -> StepSetup:
    """The step `run` executes: `make_train_step` jitted with the state's and the batch's
    shardings, the state donated. `launch.compile` AOT-compiles this same function."""
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    abstract, shardings = abstract_state(model_cfg, tx, mesh, runtime=runtime)
    micro_rows = config.train.batch_size // config.train.grad_accum
    (rows_entry,) = sharding.logical_spec(("batch",), (micro_rows,), dict(mesh.shape)) or (None,)
    rows_axes = () if rows_entry is None else np.atleast_1d(rows_entry).tolist()
    batch_shards = int(np.prod([mesh.shape[a] for a in rows_axes]))
    fn = jax.jit(
        make_train_step(
            model_cfg, tx, schedule, config.train, runtime=runtime, batch_shards=batch_shards
        ),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    return StepSetup(fn, tx, abstract, shardings)


def _summary(
    config: ml_collections.ConfigDict,
    stats: dict[str, Any],
    start: int,
    step: int,
    rows: list[dict[str, Any]],
    elapsed: float,
    preempted: bool,
    kept: str,
) -> dict[str, Any]:
    """The run's summary (returned by `run`), and its line on the console."""
    summary = {
        "start_step": start,
        "step": step,
        "preempted": preempted,
        "rows": rows,
        "train_seconds": elapsed,
        "unigram_entropy": stats["unigram_entropy_nats"],
    }
    if preempted:
        _say(f"preempted: {kept}; rerun the same command to resume")
    elif step < config.train.steps:
        _say(f"stopped after train.run_steps={config.train.run_steps}: {kept}")
    elif rows:
        summary["final_loss"] = float(rows[-1]["loss"])  # mean over the last logging interval
        held_out = ""
        if "eval_loss" in rows[-1]:
            summary["final_eval_loss"] = float(rows[-1]["eval_loss"])
            held_out = f", held-out {summary['final_eval_loss']:.3f}"
        _say(
            f"done: {step} steps in {elapsed:.0f}s; final loss {summary['final_loss']:.3f}"
            f"{held_out} nats/token vs unigram entropy {summary['unigram_entropy']:.3f}"
        )
    return summary


def _write_run_summary(workdir: str, summary: dict[str, Any], n_params: int) -> None:
    """<workdir>/run_summary.json (atomically): what train.compare reads besides the metrics;
    `wall_seconds` adds up the invocations of a resumed run."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "run_summary.json")
    try:
        with open(path) as f:
            before = float(json.load(f).get("wall_seconds", 0.0))
    except (OSError, ValueError, AttributeError):
        before = 0.0
    keep = ("step", "final_loss", "final_eval_loss", "unigram_entropy", "preempted")
    out = {k: summary[k] for k in keep if k in summary}
    out.update(parameters=n_params, wall_seconds=before + summary["train_seconds"])
    write_atomic(path, json.dumps(out, indent=1))


def _write_resolved_config(config: ml_collections.ConfigDict, model_cfg: Any, workdir: str) -> None:
    """<workdir>/config.json (atomically): the config as run, `model` the model actually built."""
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        write_atomic(path, config_schema.resolved_json(config, model_cfg))


def _check_vocab(model_cfg: Any, tokenizer_size: int) -> None:
    vocab = model_cfg.text_config.vocab_size
    if tokenizer_size > vocab:
        raise config_schema.ConfigValueError(
            f"model.text_config.vocab_size={vocab} is smaller than the tokenizer's "
            f"{tokenizer_size} pieces"
        )


def _metrics_logger(
    config: ml_collections.ConfigDict, model_cfg: Any, runtime: Any, workdir: str, start: int
) -> MetricsLogger:
    t = config.train
    tokens = t.batch_size * t.seq_len
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0 and t.mtp_lambda > 0
    per_token = flops.train_flops_per_token(model_cfg, t.seq_len, with_mtp, runtime=runtime)
    flops_per_step = per_token * tokens
    peak = t.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device()
    return MetricsLogger(
        workdir,
        total_steps=t.steps,
        tokens_per_step=int(tokens),
        flops_per_step=float(flops_per_step),
        peak_flops=peak * jax.device_count() if peak else None,
        enabled=jax.process_index() == 0,
        resume_step=start,
        config_json=config_schema.resolved_json(config, model_cfg),
    )


def _steps(
    config: ml_collections.ConfigDict,
    step_fn: Any,
    state: TrainState,
    pipe: InputPipeline,
    ckpt: Checkpointer,
    logger: MetricsLogger,
    start: int,
    stop_at: int,
    guard: PreemptionGuard,
    monitor: DivergenceMonitor,
    evaluator: evaluation.Evaluator | None = None,
) -> tuple[TrainState, int, list[dict[str, Any]], bool]:
    """Steps `start` -> `stop_at` (or a preemption); (state, step, logged rows, preempted)."""
    t = config.train
    rows: list[dict[str, Any]] = []
    evals: dict[int, dict[str, float]] = {}  # held-out results waiting for their step's row
    window: list[float] = []  # main losses of the steps since the last logged one

    def drain(done_step: int, metrics: dict[str, jax.Array]) -> None:
        """Reads a finished step's metrics (one step late) and applies the NaN policy."""
        loss, finite = jax.device_get((metrics["loss"], metrics["finite"]))
        if finite:
            window.append(float(loss))
            monitor.record(done_step, True)
            if done_step % t.log_every and done_step != stop_at and done_step not in evals:
                return
        host = jax.device_get(metrics)
        extra = {"loss_last": float(host["loss"]), "data_skipped": pipe.iterator.skipped}
        extra.update(evals.pop(done_step, {}))
        extra.update(pipe.iterator.source_metrics())  # a mixture's tokens per source
        if window:
            host["loss"] = np.mean(window)  # the mean over the logging interval
        window.clear()
        rows.append(logger.log(done_step, host, extra))
        if not finite:  # divergence.py: skip, or stop naming the step
            _say(f"step {done_step}: {cause(host)}; update skipped ({int(host['skipped'])} so far)")
            try:
                monitor.record(done_step, False, host, ckpt.latest_step())
            except (NonFiniteLossError, DivergedError):
                ckpt.close()
                raise

    step, pending, preempted = start, None, False
    gate = StepGate(guard)  # every process steps, or stops, together; starved input included
    while step < stop_at:
        if not gate.wait_for_step(pipe):
            preempted = True  # pipe.position() is before the batch not trained on
            break
        state, metrics = step_fn(state, pipe.take())
        step += 1
        if pending is not None:
            drain(*pending)
        pending = (step, metrics)
        if evaluator is not None and evaluation.due(step, t):
            result = evaluator(state.params)
            evals[step] = result.row()
            logger.exclude(result.seconds)
        if step % config.checkpoint.every_steps == 0:
            drain(*pending)  # a save needs this step's verdict (divergence.py)
            pending = None
            if monitor.can_save():
                ckpt.save(step, state, pipe.position())
    if not preempted and gate.agree(True, guard.requested)[1]:
        preempted = True  # a stop during the last step: no end-of-run work
    if pending is not None:
        drain(*pending)
    return state, step, rows, preempted
