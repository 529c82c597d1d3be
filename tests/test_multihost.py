"""Real multi-process runs on this host: 2 processes x 4 CPU devices joined by jax.distributed
(gloo) give the same losses as 1 process x 8 devices, with each process loading only its rows.

Runs `launch/local.sh` with `launch.dist_check` (sharded SGD steps of a tiny MoE model; the MoE
layers dispatch by all-to-all across the two processes), and `train.main` itself (the full
trainer: data shards per host, sharded state, checkpoints; fixed `data.num_shards` so both runs
see the same global batches).
"""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600


def run_local(nproc: int, devices: int, module: str, *flags: str, logdir: pathlib.Path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no 8-device flag
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
    "--config.train.steps=3",
    "--config.train.log_every=1",
    "--config.train.completion_tokens=0",
    "--config.data.num_shards=2",  # the same global batch for 1 or 2 processes
]


@pytest.mark.slow
def test_train_main_two_processes_match_one_process(tmp_path):
    run_local(2, 4, "train.main", *TRAIN_FLAGS, f"--workdir={tmp_path / 'two'}",
              logdir=tmp_path / "logs2")  # fmt: skip
    run_local(1, 8, "train.main", *TRAIN_FLAGS, f"--workdir={tmp_path / 'one'}",
              logdir=tmp_path / "logs1")  # fmt: skip
    losses_two, losses_one = read_losses(tmp_path / "two"), read_losses(tmp_path / "one")
    assert len(losses_one) == 3
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
