"""Never lose a good checkpoint: a diverging run stops naming the step and keeps the last finite
checkpoint; an update that would write NaN/Inf is skipped; a checkpoint whose bytes changed on
disk is detected by its checksums and the run falls back to the previous step with one warning;
Ctrl-C saves like SIGTERM. CLI runs are subprocesses of `train.main` on configs/tiny_cpu.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qwen35_jax
from qwen35_jax import sharding
from tests.runs import (
    QUIET,
    ROOT,
    TINY,
    cli,
    env_fixture,  # noqa: F401 (the `env` fixture)
    logged_steps,
    start,
    steps_on_disk,
    wait_for,
)
from train import integrity
from train.config_schema import base_config
from train.state import init_state
from train.step import make_train_step


def param_leaves_finite(step_dir):
    from train.init import params_from_training_checkpoint as restore_params  # noqa: PLC0415

    with open(os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.json")) as f:
        cfg = qwen35_jax.Qwen35Config.from_dict(json.load(f)["model"])
    abstract = jax.tree.map(
        lambda b: b.value, qwen35_jax.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "value")
    )
    params = restore_params(step_dir, abstract)
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


# ------------------------------------------------------------------ the step


@pytest.fixture(scope="module")
def tiny():
    cfg = qwen35_jax.get_config("tiny")
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=2, full_attention_interval=2)
    cfg = cfg.replace(text_config=text)
    params = qwen35_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, text.vocab_size, size=(2, 16)).astype(np.int32)
    seg = np.ones((2, 16), np.int32)
    pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
    return cfg, params, {"tokens": tok, "segment_ids": seg, "positions": pos}


@pytest.mark.parametrize(
    "tx, what",
    [
        # finite gradients, an update of inf: the parameters would turn non-finite
        (optax.stateless(lambda g, p: jax.tree.map(lambda x: x * jnp.inf, g)), "params"),
        # finite gradients and an unchanged parameter, but Adam's second moment overflows
        (optax.chain(optax.scale(1e30), optax.scale_by_adam()), "moments"),
    ],
)
def test_an_update_that_would_write_nan_or_inf_is_skipped(tiny, tx, what):
    cfg, params, batch = tiny
    train = base_config("tiny").train
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state = init_state(cfg, tx, mesh, jax.random.key(0), jax.tree.map(jnp.array, params))
    before = jax.device_get(state)
    step = jax.jit(make_train_step(cfg, tx, optax.constant_schedule(1.0), train))
    with jax.set_mesh(mesh), sharding.axis_rules():
        new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["objective"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["update_finite"]), what
    assert not bool(metrics["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
    assert bool(jax.device_get(integrity.all_finite((new.params, new.opt_state))))
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ checksums


def test_checksum_changes_with_any_element_and_is_the_same_on_any_mesh():
    x = jax.random.normal(jax.random.key(1), (8, 16, 4), jnp.float32)
    tree = {"w": x, "b": x[0, :, 0].astype(jnp.bfloat16), "n": jnp.int32(7)}
    finite, sums = integrity.digest(tree)
    assert finite
    mesh = sharding.make_mesh(fsdp=8)
    spec = jax.sharding.PartitionSpec("fsdp", None, None)
    sharded = dict(tree, w=jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)))
    assert integrity.digest(sharded)[1] == sums
    one_ulp = x.at[3, 7, 2].set(jnp.nextafter(x[3, 7, 2], jnp.inf))
    assert integrity.mismatches(sums, integrity.digest(dict(tree, w=one_ulp))[1]) == ["w"]
    swapped = x.at[0, 0, 0].set(x[0, 0, 1]).at[0, 0, 1].set(x[0, 0, 0])
    assert integrity.mismatches(sums, integrity.digest(dict(tree, w=swapped))[1]) == ["w"]
    assert not integrity.digest(dict(tree, w=x.at[0, 0, 0].set(jnp.nan)))[0]


# ------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path, env):
    workdir = tmp_path / "run"
    # clip_norm=0 throughout: with clipping off, an lr of 1e4 turns finite gradients into
    # parameters that overflow (the optimizer's state layout must stay the same to resume)
    args = ["--config.train.steps=12", "--config.checkpoint.keep=1", *QUIET]
    args += ["--config.optimizer.clip_norm=0", "--config.checkpoint.every_steps=4"]
    first = cli(workdir, *args, "--config.train.run_steps=4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_on_disk(workdir) == [4]

    # train.max_skips_in_a_row=3: three skipped steps in a row are a divergence
    bad = cli(
        workdir, *args, "--config.optimizer.lr=1e4", "--config.train.max_skips_in_a_row=3", env=env
    )
    assert bad.returncode != 0, bad.stdout[-3000:]
    found = re.search(r"diverged at step ([5-7])\b.* in each of the 3 steps", bad.stderr)
    assert found, bad.stderr[-3000:]
    assert "train.max_skips_in_a_row=3" in bad.stderr
    assert "the last checkpoint (step 4) is intact" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "done:" not in bad.stdout
    assert steps_on_disk(workdir) == [4], "nothing saved from the diverged state, 4 kept"
    assert param_leaves_finite(str(workdir / "checkpoints" / "4"))

    again = cli(workdir, *args, "--config.optimizer.lr=1e-3", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step 4" in again.stdout
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert rows[-1]["step"] == 12 and np.isfinite(rows[-1]["loss"]) and rows[-1]["skipped"] == 0


def _flip_64_bytes(state_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        f.seek(size // 2)
        data = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x01 for b in data))  # same size; float low bits: still finite
    assert os.path.getsize(big) == size


@pytest.mark.slow
def test_corrupt_checkpoint_is_detected_and_the_run_falls_back_with_one_warning(tmp_path, env):
    workdir = tmp_path / "run"
    every = "--config.checkpoint.every_steps=2"  # two checkpoints in few steps
    first = cli(workdir, "--config.train.steps=4", every, *QUIET, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_on_disk(workdir) == [2, 4]
    _flip_64_bytes(workdir / "checkpoints" / "4" / "state")

    r = cli(workdir, "--config.train.steps=6", every, *QUIET, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "corrupt" in line]
    assert len(warnings) == 1 and "checkpoint step 4 is corrupt" in warnings[0], r.stderr[-3000:]
    assert "checksum mismatch" in warnings[0]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "resumed from checkpoint step 2" in r.stdout
    assert steps_on_disk(workdir, "checkpoints.corrupt") == [4]
    assert steps_on_disk(workdir) == [4, 6]


def test_ctrl_c_saves_and_exits_like_sigterm(tmp_path, env):
    workdir = tmp_path / "run"
    args = ["--config.train.steps=100000", "--config.checkpoint.every_steps=100000", *QUIET]
    proc = start(workdir, *args, env=env)
    wait_for(proc, lambda: len(logged_steps(workdir)) >= 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in out
    assert "Traceback" not in err, err[-3000:]
    (saved,) = steps_on_disk(workdir)
    assert saved >= 2
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]


_STARVING_MAIN = """
import os, runpy, sys, threading
from train.data import iterator

read = iterator.DataIterator.__next__
calls = [0]

def starving(self):  # 3 batches, then a source that never yields again
    calls[0] += 1
    if calls[0] > 3:
        open(os.environ["STARVED_MARKER"], "w").close()
        threading.Event().wait()
    return read(self)

iterator.DataIterator.__next__ = starving
sys.argv[0] = "train.main"
runpy.run_module("train.main", run_name="__main__")
"""


@pytest.mark.slow  # a train.main run: ~40 s of CPU
def test_sigterm_while_the_input_pipeline_is_starved_stops_promptly_and_saves(tmp_path, env):
    """Before the fix the loop sat in the data read forever: the SIGTERM flag was set and never
    looked at."""
    workdir, marker = tmp_path / "run", tmp_path / "starved"
    args = ["--config.train.steps=100", "--config.checkpoint.every_steps=100", *QUIET]
    cmd = [sys.executable, "-c", _STARVING_MAIN, f"--workdir={workdir}", f"--config={TINY}"]
    proc = subprocess.Popen(
        cmd + args,
        cwd=ROOT,
        env=dict(env, STARVED_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(proc, marker.exists)
    time.sleep(1.0)  # well inside the blocked read
    proc.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not stop a run whose input was starved") from None
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: checkpoint saved at step 3" in out, out[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert time.perf_counter() - t0 < 60
    assert steps_on_disk(workdir) == [3]
    (data,) = (workdir / "checkpoints" / "3" / "data").glob("process_*.json")
    assert json.loads(data.read_text())["rows"] == 3 * 4, "the position before the starved read"


_FULL_DISK_MAIN = """
import errno, runpy, sys
from train.data import iterator

write = iterator.DataCheckpointHandler.save
calls = [0]

def full_disk(self, directory, item=None, args=None):  # the first checkpoint fits, no other
    calls[0] += 1
    if calls[0] > 1:
        path = str(directory / "process_0-of-1.json")
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return write(self, directory, item, args)

iterator.DataCheckpointHandler.save = full_disk
sys.argv[0] = "train.main"
runpy.run_module("train.main", run_name="__main__")
"""


@pytest.mark.slow  # two train.main runs: ~55 s of CPU
def test_a_full_disk_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path, env):
    """ENOSPC in an (async) checkpoint write: exit 1, one line on stderr (orbax's traceback of
    its save thread is dropped), the previous checkpoint intact and resumable."""
    workdir = tmp_path / "run"
    args = ["--config.train.steps=12", "--config.checkpoint.every_steps=4", *QUIET]
    cmd = [sys.executable, "-c", _FULL_DISK_MAIN, f"--workdir={workdir}", f"--config={TINY}"]
    r = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: no space left writing ") and "checkpoints/8" in lines[0]
    assert "the last complete checkpoint is kept" in lines[0]
    assert steps_on_disk(workdir) == [4]

    again = cli(workdir, *args, "--config.train.run_steps=1", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step 4" in again.stdout
    assert steps_on_disk(workdir) == [4, 5]


@pytest.mark.slow
def test_after_sigkill_and_resume_metrics_have_each_step_once(tmp_path, env):
    workdir = tmp_path / "run"
    args = ["--config.train.steps=100000", "--config.checkpoint.every_steps=4", *QUIET]
    proc = start(workdir, *args, env=env)
    metrics = workdir / "metrics.jsonl"
    saved4 = workdir / "checkpoints" / "4"  # is_dir once the async save has completed
    wait_for(proc, lambda: saved4.is_dir() and len(logged_steps(workdir)) >= 6, poll=0.1)
    proc.kill()  # SIGKILL: no save, no cleanup; the workdir lock stays behind
    proc.communicate()
    saved = max(steps_on_disk(workdir))
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert max(logged) > saved, "steps after the checkpoint were logged before the crash"

    r = cli(workdir, *args, "--config.train.run_steps=3", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over" in r.stderr and f"resumed from checkpoint step {saved}" in r.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 4)), steps
    newest = max((workdir / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime)
    # Event field 7 (session_log) = {status: START} (field 6 is the deprecated log_message, where
    # the former hand-made writer put it)
    start_event = b"\x3a\x02\x08\x01"
    assert start_event in newest.read_bytes()
