"""A graceful stop with several processes while an input pipeline is starved (issue 14, point 7).

The step gate (train/step_gate.py) first with threads standing in for processes and a fake
coordination client (fast), then `train.main` on 2 real processes (jax.distributed over local
processes, gloo collectives, as tests/test_multihost.py) whose process 0's source blocks forever
after 3 batches: SIGTERM to both, or to only one, ends both with exit 0 and the step saved, each
process's data position the one before the batch it did not train on. Before the step gate the
non-starved process entered the step's collectives alone and neither process ever exited.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from tests.runs import ROOT, TINY
from train.step_gate import StepGate

# ------------------------------------------------------------------ the gate, processes as threads


class FakeClient:
    """The coordination service's key-value store and barrier, for threads."""

    def __init__(self, processes: int):
        self.kv: dict[str, str] = {}
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(processes)
        self.barriers = [0] * processes

    def key_value_set(self, key, value):
        with self.lock:
            assert key not in self.kv, key
            self.kv[key] = value

    def key_value_delete(self, key):
        with self.lock:
            del self.kv[key]

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

    def wait_at_barrier(self, name, timeout_ms):
        del name, timeout_ms
        self.barrier.wait(timeout=30)  # a broken protocol fails the test instead of hanging


class Source:
    """wait_ready: True after `ready_after` seconds (None: starved forever)."""

    def __init__(self, ready_after: float | None):
        self.t0, self.ready_after = time.monotonic(), ready_after

    def wait_ready(self, timeout_s):
        if self.ready_after is not None and time.monotonic() - self.t0 >= self.ready_after:
            return True
        time.sleep(timeout_s)
        return False


def run_gates(ready_after, stop_at=None, stop_who=(), steps=1):
    """Each thread (process) waits for `steps` steps; `stop_who` ask to stop at `stop_at` s.
    Returns [(verdicts, seconds)] per process."""
    n = len(ready_after)
    client = FakeClient(n)
    guards = [types.SimpleNamespace(requested=False) for _ in range(n)]
    out: list = [None] * n

    def process(i):
        gate = StepGate(guards[i], poll_s=0.02, client=client, processes=n, index=i, name="t")
        t0, verdicts = time.monotonic(), []
        for _ in range(steps):
            verdicts.append(gate.wait_for_step(Source(ready_after[i])))
            if not verdicts[-1]:
                break
        out[i] = (verdicts, time.monotonic() - t0)

    threads = [threading.Thread(target=process, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    if stop_who:
        time.sleep(stop_at)
        for i in stop_who:
            guards[i].requested = True
    for th in threads:
        th.join(timeout=30)
    assert not any(th.is_alive() for th in threads), "a gate hung"
    assert len(client.kv) <= n, "keys of old rounds are deleted"
    return out


def test_gate_steps_when_every_process_has_its_batch():
    out = run_gates([0.0, 0.0, 0.0], steps=5)
    assert [v for v, _ in out] == [[True] * 5] * 3


def test_gate_waits_for_the_slowest_process_and_all_step_together():
    out = run_gates([0.0, 0.3], steps=1)
    assert [v for v, _ in out] == [[True], [True]]
    assert all(0.25 < s < 2 for _, s in out), out  # process 0 waited for process 1's batch


@pytest.mark.parametrize("stop_who", [(0, 1), (0,), (1,)])
def test_a_stop_to_any_process_stops_all_while_one_is_starved(stop_who):
    """Process 0 starved forever, process 1 ready: the stop reaches both in a few polls."""
    out = run_gates([None, 0.0], stop_at=0.3, stop_who=stop_who)
    assert [v for v, _ in out] == [[False], [False]]
    assert all(s < 0.3 + 1.0 for _, s in out), out


def test_a_stop_while_all_are_starved_stops_all():
    out = run_gates([None, None, None], stop_at=0.2, stop_who=(2,))
    assert [v for v, _ in out] == [[False]] * 3


# ------------------------------------------------------------------ train.main on 2 processes

_STARVING_MAIN = """
import os, runpy, sys, threading
from train.data import iterator

read = iterator.DataIterator.__next__
calls = [0]

def starving(self):  # process 0: 3 batches, then a source that never yields again
    calls[0] += 1
    if calls[0] > 3 and os.environ["JAX_PROCESS_ID"] == "0":
        open(os.environ["STARVED_MARKER"], "w").close()
        threading.Event().wait()
    return read(self)

iterator.DataIterator.__next__ = starving
sys.argv[0] = "train.main"
runpy.run_module("train.main", run_name="__main__")
"""


def start_two(workdir, marker):
    """2 processes x 1 CPU device of train.main on tiny_cpu (no compilation cache: a process
    that hits it while the other compiles would wait > 30 s in gloo's first collective)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    flags = ["--config.train.steps=100", "--config.checkpoint.every_steps=100",
             "--config.train.completion_tokens=0", "--config.train.log_every=1",
             "--config.model.text_config.mtp_num_hidden_layers=0"]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
        env.update(
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
            PYTHONPATH=ROOT,
            STARVED_MARKER=str(marker),
        )
        # the dense variant without MTP compiles fastest: less room for the processes to drift
        cmd = [sys.executable, "-c", _STARVING_MAIN, f"--workdir={workdir}"]
        cmd += [f"--config={TINY}:dense"]
        procs.append(
            subprocess.Popen(
                cmd + flags,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.slow  # 2 train.main processes: ~25 s of CPU each case
@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["sigterm_both", "sigterm_one"])
def test_sigterm_with_one_process_starved_stops_both_and_saves(tmp_path, signalled):
    workdir, marker = tmp_path / "run", tmp_path / "starved"
    procs = start_two(workdir, marker)
    try:
        deadline = time.time() + 600
        while not marker.exists() and time.time() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the blocked read (process 1 waits at the gate)
        for rank in signalled:
            procs[rank].send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=60)[0])
            except subprocess.TimeoutExpired:
                raise AssertionError(f"SIGTERM to {signalled}: a process did not stop") from None
        took = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "preempted: checkpoint saved at step 3" in outs[0], outs[0][-3000:]
    assert "Traceback" not in outs[0] + outs[1]
    assert took < 90, took  # the stop itself takes a few polls; the save and exit the rest
    step_dir = workdir / "checkpoints" / "3"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    for data in sorted((step_dir / "data").glob("process_*.json")):
        # 2 rows per process and step: the position before the batch neither trained on
        assert json.loads(data.read_text())["rows"] == 3 * 2, data.name
