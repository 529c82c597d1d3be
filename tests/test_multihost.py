"""Real multi-process runs on this host: 2 processes x 4 CPU devices joined by jax.distributed
(gloo) give the same losses as 1 process x 8 devices, with each process loading only its rows.

Runs `launch/local.sh` with `launch.dist_check` (sharded SGD steps of a tiny MoE model; the MoE
layers dispatch by all-to-all across the two processes), and `train.main` itself (the full
trainer with its default data layout: data shards per host, sharded state, checkpoints, and the
end-of-run greedy completions, computed by every process); a checkpoint written by 2 x 4 resumes
on 1 x 8 and on 1 x 4 (another mesh) with the batches and losses of a straight run.
"""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600


def run_local(nproc: int, devices: int, module: str, *flags: str, logdir: pathlib.Path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8-device flag
    if nproc > 1:
        # no compilation cache across processes: only process 0 writes it, and a process that
        # loads a step while another compiles it waits past gloo's 30 s deadline (seen here:
        # "Gloo context initialization failed: DEADLINE_EXCEEDED")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(LAUNCH_MODULE=module, LAUNCH_LOGDIR=str(logdir))
    logdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["launch/local.sh", str(nproc), str(devices), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    logs = "\n".join(p.read_text() for p in sorted(logdir.glob("proc_*.log")))
    assert r.returncode == 0, f"{r.stderr}\n{logs[-4000:]}"
    return logs


def read_losses(workdir: pathlib.Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    flags = ["--mesh", "expert=8", "--steps", "3"]  # the all-to-all spans both processes
    two = tmp_path / "two"
    logs = run_local(2, 4, "launch.dist_check", *flags, "--workdir", str(two),
                     logdir=tmp_path / "logs2")  # fmt: skip
    reports = [json.loads(x) for x in logs.splitlines() if x.startswith('{"process"')]
    assert sorted(r["process"] for r in reports) == [0, 1]
    assert all(r["processes"] == 2 and r["distributed"] for r in reports)
    assert sorted(tuple(r["rows"]) for r in reports) == [(0, 4), (4, 8)]  # per-host data
    one = tmp_path / "one"
    run_local(1, 8, "launch.dist_check", *flags, "--workdir", str(one), logdir=tmp_path / "logs1")
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_one) == 3 and losses_one[0] > losses_one[-1]  # it trains
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)


TRAIN_FLAGS = [
    "--config=configs/tiny_cpu.py",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
    "--config.mesh.expert=4",
    "--config.train.batch_size=8",
    "--config.train.steps=4",
    "--config.train.log_every=1",
    "--config.train.completion_tokens=4",  # the end-of-run completions run on every process
]
ON_4_DEVICES = ["--config.mesh.fsdp=-1", "--config.mesh.expert=1"]
# the resume runs' completions are not compared (test_train_main_two_processes_match_one_process
# compares them): skipping them saves tracing and compiling generation in both resume runs
NO_COMPLETIONS = ["--config.train.completion_tokens=0"]


def completions(logs: str) -> list[str]:
    lines = logs.splitlines()
    start = lines.index("greedy completions:")
    return [x for x in lines[start + 1 :] if x.startswith("  ")]


@pytest.fixture(scope="module")
def straight_one_process(tmp_path_factory):
    """1 process x 8 devices, 4 steps: (losses, completions)."""
    tmp = tmp_path_factory.mktemp("straight")
    logs = run_local(1, 8, "train.main", *TRAIN_FLAGS, f"--workdir={tmp / 'run'}",
                     logdir=tmp / "logs")  # fmt: skip
    return read_losses(tmp / "run"), completions(logs)


@pytest.mark.slow
def test_train_main_two_processes_match_one_process(tmp_path, straight_one_process):
    """Default data layout (no data.num_shards): the same batches and losses; the run ends with
    the same completions instead of crashing (process 0 alone) and hanging (the others)."""
    logs = run_local(2, 4, "train.main", *TRAIN_FLAGS, f"--workdir={tmp_path / 'two'}",
                     logdir=tmp_path / "logs2")  # fmt: skip
    losses_one, completions_one = straight_one_process
    losses_two = read_losses(tmp_path / "two")
    assert len(losses_one) == 4
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    assert completions_one and completions(logs) == completions_one
    assert logs.count("greedy completions:") == 1  # printed by process 0 only


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_another_topology(tmp_path, straight_one_process):
    """2 x 4 stops after 2 steps (train.run_steps); the checkpoint resumes on 1 x 8 and on 1 x 4
    (fsdp=4 instead of fsdp=2 x expert=4) and continues with the straight run's batches."""
    first = tmp_path / "first"
    run_local(2, 4, "train.main", *TRAIN_FLAGS, *NO_COMPLETIONS, "--config.train.run_steps=2",
              f"--workdir={first}", logdir=tmp_path / "logs_first")  # fmt: skip
    losses_one, _ = straight_one_process
    for name, nproc, devices, flags, rtol in (
        ("on_1x8", 1, 8, [], 1e-5),
        ("on_1x4", 1, 4, ON_4_DEVICES, 1e-4),  # another mesh: other reduction orders
    ):
        workdir = tmp_path / name
        shutil.copytree(first, workdir)
        logs = run_local(nproc, devices, "train.main", *TRAIN_FLAGS, *NO_COMPLETIONS, *flags,
                         f"--workdir={workdir}", logdir=tmp_path / f"logs_{name}")  # fmt: skip
        assert "resumed from checkpoint step 2" in logs
        losses = read_losses(workdir)
        assert len(losses) == 4, losses
        for a, b in zip(losses, losses_one, strict=True):
            assert abs(a - b) <= rtol * abs(b), (name, losses, losses_one)
