"""Converter leftovers: a conversion stopped by SIGTERM removes its partial output; temporaries
of converters that died (SIGKILL) are removed by the next run, those of live ones are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qwen35_jax.convert import __main__ as cli
from qwen35_jax.convert import orbax_io
from tests import hf_oracle


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = hf_oracle.build(num_hidden_layers=2, full_attention_interval=2)
    return hf_oracle.save(model, tmp_path_factory.mktemp("hf") / "tiny")


def test_sigterm_during_conversion_removes_the_partial_output(
    hf_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    calls = []

    def update(self, tensors, nbytes):
        calls.append(tensors)
        if len(calls) == 3:  # mid-way, with tensors already written
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(orbax_io.Progress, "update", update)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and len(calls) == 3
    assert "interrupted (SIGTERM): the partial output was removed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_dead_converters_are_removed(hf_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = tmp_path / f"out.tmp-{dead.pid}-abc123"
    (stale / "params").mkdir(parents=True)
    live = tmp_path / f"out.tmp-{os.getppid()}-def456"  # a process that is running
    live.mkdir()
    code = cli.main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", str(out), "--no_progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"removed {stale}: left by converter process {dead.pid}, which is gone" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name])


def test_old_temporaries_without_a_pid_are_removed_once_idle_and_named_while_recent(
    hf_dir, tmp_path, capsys
):
    """`<out>.tmp-XXXX` (tempfile's suffix, no pid: older converters) cannot be matched to a
    process: removed when nothing in it changed for 10 min, else named and left."""
    out = tmp_path / "out"
    old = tmp_path / "out.tmp-k2j4h_x9"
    (old / "params").mkdir(parents=True)
    (old / "params" / "chunk").write_bytes(b"x" * 64)
    hour_ago = time.time() - 3600
    for p in (old / "params" / "chunk", old / "params", old):
        os.utime(p, (hour_ago, hour_ago))
    recent = tmp_path / "out.tmp-abcd1234"
    recent.mkdir()
    code = cli.main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", str(out), "--no_progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"removed {old}: left by an older converter, unchanged for 60 min" in err
    assert f"left {recent}: a temporary of an older converter" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["out", recent.name])
