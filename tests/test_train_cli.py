"""The pretraining CLI end to end, as a user runs it: bad overrides, exact resume, SIGTERM,
incomplete checkpoints. Each run is a subprocess of `python -m train.main` on configs/tiny_cpu.py
(one CPU device); a shared persistent compilation cache keeps the repeated compiles cheap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.runs import (
    QUIET,
    ROOT,
    cli,
    env_fixture,  # noqa: F401 (the `env` fixture)
    logged_steps,
    losses,
    start,
    steps_on_disk,
    wait_for,
)


@pytest.mark.parametrize(
    "override, names",
    [
        ("--config.train.stpes=3", ["train.stpes", "train.steps"]),
        (
            "--config.model.text_config.num_hiden_layers=8",
            ["model.text_config.num_hiden_layers", "num_hidden_layers"],
        ),
        ("--config.optimizer.lr=fast", ["optimizer.lr"]),
        ("--config.train.steps=1.5", ["train.steps"]),
        ("--config.model.text_config.num_hidden_layers=0", ["model.text_config.num_hidden_layers"]),
        ("--config.train.nan_policy=ignore", ["train.nan_policy"]),
    ],
)
def test_bad_override_is_refused_naming_the_key(tmp_path, env, override, names):
    workdir = tmp_path / "run"
    t0 = time.perf_counter()
    r = cli(workdir, override, env=env)
    assert r.returncode != 0
    for name in names:
        assert name in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not workdir.exists(), "refused before any work: nothing may be written"
    assert time.perf_counter() - t0 < 60


def test_object_store_workdir_is_refused_before_any_work(env):
    r = cli("gs://bucket/run", env=env)
    assert r.returncode != 0
    assert "--workdir='gs://bucket/run'" in r.stderr and "gcsfuse" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "no local 'gs:' directory"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("straight")
    r = cli(workdir, "--config.train.steps=6", "--config.checkpoint.every_steps=3", *QUIET, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("resumed")
    args = ["--config.train.steps=6", "--config.checkpoint.every_steps=3", *QUIET]
    first = cli(workdir, *args, "--config.train.run_steps=3", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps_on_disk(workdir) == [3]
    second = cli(workdir, *args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint step 3" in second.stdout
    return workdir


def test_resume_gives_exactly_the_losses_of_a_straight_run(straight_run, resumed_run):
    want, got = losses(straight_run), losses(resumed_run)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert steps_on_disk(resumed_run) == [3, 6]
    config = json.loads((resumed_run / "config.json").read_text())
    assert config["train"]["steps"] == 6
    assert config["model"]["text_config"]["num_hidden_layers"] == 2


def test_rerunning_a_finished_run_says_it_is_finished(straight_run, tmp_path, env):
    """(The straight run's copy: a finished run needs no run of its own.)"""
    workdir = tmp_path / "copy"
    shutil.copytree(straight_run, workdir)
    r = cli(workdir, "--config.train.steps=6", "--config.checkpoint.every_steps=3", *QUIET, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished: step 6 of train.steps=6; nothing to train" in r.stdout


def test_changed_data_layout_is_refused_naming_it(resumed_run, tmp_path, env):
    """Another data.num_shards cannot continue the checkpoint's data stream: one line, no
    traceback, and the checkpoints stay where they are."""
    workdir = tmp_path / "copy"
    shutil.copytree(resumed_run, workdir)
    r = cli(workdir, "--config.train.steps=8", "--config.data.num_shards=2", *QUIET, env=env)
    assert r.returncode == 1
    assert "error: " in r.stderr and "data.num_shards 1 -> 2" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert steps_on_disk(workdir) == [3, 6]


def test_incomplete_checkpoint_is_skipped_with_a_warning(resumed_run, tmp_path, env):
    workdir = tmp_path / "copy"
    shutil.copytree(resumed_run, workdir)
    ckpt = workdir / "checkpoints"
    shutil.rmtree(ckpt / "6" / "state")  # a step whose state never got written
    (ckpt / "9.orbax-checkpoint-tmp-1234").mkdir()  # a save cut short by a crash
    r = cli(workdir, "--config.train.steps=6", "--config.checkpoint.every_steps=3", *QUIET, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "9.orbax-checkpoint-tmp-1234 was left incomplete" in r.stderr
    assert "checkpoint step 6 is incomplete or unreadable" in r.stderr
    assert "resumed from checkpoint step 3" in r.stdout
    assert sorted(os.listdir(str(ckpt) + ".incomplete")) == ["6", "9.orbax-checkpoint-tmp-1234"]
    assert steps_on_disk(workdir) == [3, 6]
    # steps 4..6 were trained again from step 3: the same losses as the first time
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r["loss"] for r in rows[-3:]}
    first = losses(resumed_run)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resume_continues(tmp_path, env):
    workdir = tmp_path / "run"
    args = ["--config.train.steps=100000", "--config.checkpoint.every_steps=100000", *QUIET]
    proc = start(workdir, *args, env=env)
    wait_for(proc, lambda: len(logged_steps(workdir)) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in out
    (saved,) = steps_on_disk(workdir)
    assert saved >= 2
    logged = max(losses(workdir))
    assert logged == saved  # every step taken was logged and is in the checkpoint

    r = cli(
        workdir,
        "--config.train.steps=100000",
        "--config.checkpoint.every_steps=100000",
        "--config.train.run_steps=2",
        *QUIET,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {saved}" in r.stdout
    assert steps_on_disk(workdir) == [saved, saved + 2]
    assert sorted(losses(workdir))[-2:] == [saved + 1, saved + 2]
