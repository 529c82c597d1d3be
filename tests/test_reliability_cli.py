"""Checks that refuse nonsense, in one line: an unknown config variant (listing the known ones),
a seq_len that leaves a head without targets (naming the key); `--help` exits 0 listing every
key with its default; a run that cannot resume says so in a few lines and leaves the workdir's
config.json as it was."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys

import pytest

from train import config_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)


def main(*args, timeout=600):
    cmd = [sys.executable, "-m", "train.main", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_unknown_variant_is_refused_listing_the_known_ones(tmp_path):
    r = main(f"--config={TINY}:bogus", f"--workdir={tmp_path / 'run'}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: --config={TINY}:bogus: unknown variant 'bogus'; known: moe, dense"
    ]
    assert not (tmp_path / "run").exists()


def test_help_exits_0_and_lists_sections_and_keys_with_defaults():
    r = main("--help", f"--config={TINY}", timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ("  [train]", "  [optimizer]", "    --config.train.seq_len=64"):
        assert line in r.stdout.splitlines(), r.stdout[:3000]
    assert "    --config.model.text_config.hidden_size=32" in r.stdout
    assert "    --config.checkpoint.keep=2" in r.stdout


@pytest.mark.parametrize("seq_len, mtp_lambda, need", [(1, 0.3, 3), (2, 0.3, 3), (1, 0.0, 2)])
def test_seq_len_without_targets_is_refused_naming_the_key(seq_len, mtp_lambda, need):
    c = runpy.run_path(TINY)["get_config"]()
    c.train.seq_len, c.train.mtp_lambda = seq_len, mtp_lambda
    with pytest.raises(config_schema.ConfigValueError) as e:
        config_schema.validate(c)
    assert str(e.value).startswith(f"train.seq_len={seq_len} leaves no targets")
    assert f"must be >= {need}" in str(e.value)
    c.train.seq_len = need
    config_schema.validate(c)


@pytest.mark.slow
def test_a_run_that_cannot_resume_says_so_briefly_and_keeps_config_json(tmp_path):
    work = tmp_path / "run"
    quick = ["--config.train.steps=2", "--config.train.completion_tokens=0"]
    first = main(f"--config={TINY}", f"--workdir={work}", *quick)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (work / "config.json").read_text()
    r = main(
        f"--config={TINY}", f"--workdir={work}", *quick, "--config.model.text_config.hidden_size=64"
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if "TPU" not in x]
    assert len(lines) <= 4 and lines[-1].startswith("error: no checkpoint in"), r.stderr[-3000:]
    assert (work / "config.json").read_text() == before


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    from train import workdir_lock  # noqa: PLC0415

    work = tmp_path / "run"
    path = workdir_lock.acquire(str(work))  # this test process holds it, as a live run would
    try:
        r = main(f"--config={TINY}", f"--workdir={work}", timeout=300)
    finally:
        workdir_lock.release(path)
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"another run (pid {os.getpid()} on " in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(work) == [], "the refused run wrote nothing (and left our lock alone)"


def test_workdir_lock_takes_over_dead_holders_and_spares_other_processes(tmp_path, capsys):
    from train import workdir_lock  # noqa: PLC0415

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with workdir_lock.hold(str(tmp_path)):
        assert f"its holder (pid {dead.pid} on" in capsys.readouterr().err
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on"):
            workdir_lock.acquire(str(tmp_path))
        with workdir_lock.hold(str(tmp_path), process_index=1, processes=2):
            pass  # another process of the same run: no lock, no refusal
    assert not lock.exists()
