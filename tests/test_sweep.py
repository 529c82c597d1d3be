"""launch.sweep: run names, product and zip, refusal of a bad override before anything runs,
finished runs skipped, pod/cluster commands printed, sweep files (no training here)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")


def test_runs_are_the_product_or_the_zip_with_readable_names():
    axes = [
        sweep.parse_axis("optimizer.lr=1e-3,3e-3"),
        sweep.parse_axis("--config.model.text_config.full_attention_interval=2,4"),
    ]
    names = [r.name for r in sweep.make_runs(axes)]
    assert names == [
        "lr=1e-3_full_attention_interval=2",
        "lr=1e-3_full_attention_interval=4",
        "lr=3e-3_full_attention_interval=2",
        "lr=3e-3_full_attention_interval=4",
    ]
    zipped = sweep.make_runs(axes, zipped=True)
    assert [r.name for r in zipped] == [
        "lr=1e-3_full_attention_interval=2",
        "lr=3e-3_full_attention_interval=4",
    ]
    assert zipped[1].flags() == [
        "--config.optimizer.lr=3e-3",
        "--config.model.text_config.full_attention_interval=4",
    ]
    # values with commas inside brackets; keys sharing their last part keep the whole key
    assert sweep.split_values("(1,2),(3,4),'a,b'") == ["(1,2)", "(3,4)", "'a,b'"]
    same = sweep.make_runs([sweep.parse_axis("train.seed=1"), sweep.parse_axis("data.seed=2")])
    assert same[0].name == "train.seed=1_data.seed=2"
    with pytest.raises(sweep.SweepError, match="--zip needs axes of one length"):
        sweep.make_runs([axes[0], sweep.parse_axis("train.seed=1,2,3")], zipped=True)
    with pytest.raises(sweep.SweepError, match="expected KEY=V1,V2"):
        sweep.parse_axis("optimizer.lr")


@pytest.mark.parametrize(
    "axis, message",
    [
        ("optimizer.lrr=1e-3,3e-3", "run lrr=1e-3: unknown config key 'optimizer.lrr'; did you"),
        ("optimizer.lr=1e-3,-1", "run lr=-1: invalid config: optimizer.lr=-1.0 must be > 0"),
        ("optimizer.lr=1e-3,abc", "run lr=abc: bad config override: flag --config.optimizer.lr"),
    ],
)
def test_a_bad_override_in_any_run_refuses_the_sweep_before_anything_runs(
    tmp_path, monkeypatch, capsys, axis, message
):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    code = sweep.main([f"--config={TINY}", f"--workdir={tmp_path / 's'}", "--sweep", axis])
    assert code == 2 and not calls and not (tmp_path / "s").exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_finished_runs_are_skipped_and_the_others_run_in_order(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    done = tmp_path / "lr=1e-3"
    done.mkdir(parents=True)
    (done / "run_summary.json").write_text(json.dumps({"step": 7, "preempted": False}))
    half = tmp_path / "lr=2e-3"
    half.mkdir()
    (half / "run_summary.json").write_text(json.dumps({"step": 3, "preempted": False}))
    args = [f"--config={TINY}", f"--workdir={tmp_path}", "--sweep", "optimizer.lr=1e-3,2e-3,3e-3"]
    assert sweep.main([*args, "--", "--config.train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] lr=1e-3: finished, skipped" in out
    assert "[2/3] lr=2e-3: resumes" in out and "[3/3] lr=3e-3: starts" in out
    assert [c[c.index("-m") + 1] for c in calls] == ["train.main", "train.main"]
    assert [c for c in calls[0] if c.startswith("--workdir")] == [f"--workdir={half}"]
    assert calls[1][-2:] == ["--config.optimizer.lr=3e-3", "--config.train.steps=7"]
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == ["lr=1e-3", "lr=2e-3", "lr=3e-3"]


def test_pod_and_cluster_launchers_print_one_command_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    base = [f"--config={TINY}", f"--workdir={tmp_path}", "--sweep", "train.seed=1,2"]
    assert sweep.main([*base, "--launcher=slurm", "--launcher_args=--nodes=2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sbatch")]
    assert len(lines) == 2
    assert lines[0].startswith("sbatch --job-name=seed=1 --nodes=2 launch/gpu_slurm.sbatch ")
    assert sweep.main([*base, "--launcher=tpu_pod", "--launcher_args=--name p --zone z"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "tpu_pod.sh" in x]
    assert lines[1].startswith("launch/tpu_pod.sh --name p --zone z -- --config=")
    assert lines[1].endswith(f"--workdir={tmp_path}/seed=2 --config.train.seed=2")


def test_a_sweep_file_gives_config_axes_and_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    path = tmp_path / "s.py"
    path.write_text(
        f"CONFIG = {TINY!r}\nSWEEP = ['train.seed=1,2', 'optimizer.lr=1e-3,2e-3']\nZIP = True\n"
        "FLAGS = ['--config.train.steps=3']\n"
    )
    assert sweep.main([f"--sweep_file={path}", f"--workdir={tmp_path / 'w'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 runs" in out and "seed=2_lr=2e-3: starts: " in out
    assert "--config.train.steps=3" in out and not (tmp_path / "w").exists()
    default = os.path.join(ROOT, "configs", "sweeps", "default_ablation.py")
    assert sweep.main([f"--sweep_file={default}", f"--workdir={tmp_path / 'd'}", "--dry-run"]) == 0
    assert "sweep: 4 runs" in capsys.readouterr().out
