"""Helpers shared by the tests that run `python -m train.main` as a user would (a subprocess on
configs/tiny_cpu.py, one CPU device): the environment (every run of the session shares
conftest's persistent compilation cache, so repeated compiles are cheap), a blocking run, a
background run, and what a workdir holds afterwards.

A module uses the `env` fixture by importing it: `from tests.runs import env_fixture  # noqa: F401`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")
QUIET = ["--config.train.completion_tokens=0", "--config.train.log_every=1"]


@pytest.fixture(scope="module", name="env")
def env_fixture() -> dict[str, str]:
    """The subprocesses' environment: CPU only, this checkout first, and (inherited from
    tests/conftest.py) the session's one compilation cache, shared with every module and xdist
    worker: the same tiny_cpu steps compile in several modules."""
    e = dict(os.environ)
    e.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return e


def command(workdir, *overrides, config: str = TINY, module: str = "train.main") -> list[str]:
    return [sys.executable, "-m", module, f"--workdir={workdir}", f"--config={config}", *overrides]


def cli(workdir, *overrides, env, config: str = TINY, timeout: float = 900):
    """`train.main` run to its end: the CompletedProcess (text stdout / stderr)."""
    cmd = command(workdir, *overrides, config=config)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start(workdir, *overrides, env, config: str = TINY, module: str = "train.main"):
    """`train.main` (or another module taking --workdir and --config) in the background."""
    return subprocess.Popen(
        command(workdir, *overrides, config=config, module=module),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc, ready, timeout: float = 600, poll: float = 0.2) -> None:
    """Waits until `ready()` while `proc` runs; fails with its stderr if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(poll)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    raise AssertionError(f"not ready after {timeout} s")


def logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # complete lines only (the run may be writing one)
    return [json.loads(line)["step"] for line in lines if line.strip()]


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def steps_on_disk(workdir, name: str = "checkpoints") -> list[int]:
    d = os.path.join(workdir, name)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
