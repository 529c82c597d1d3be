"""Launchers' dry runs (every command printed, nothing run) and the memory planner."""

import pathlib
import subprocess

import jax
import pytest

import qwen35_jax as q
from launch import plan as planner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


# ---------------------------------------------------------------------------------- local.sh


def test_local_dry_run_prints_one_command_per_process():
    r = sh("launch/local.sh", "--dry-run", "2", "4", "--workdir", "/tmp/a b", "--steps=3")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    assert lines[-1] == "wait"
    procs = lines[:-1]
    assert len(procs) == 2
    for rank, line in enumerate(procs):
        assert f"JAX_PROCESS_ID={rank}" in line
        assert "JAX_NUM_PROCESSES=2" in line and "JAX_COORDINATOR_ADDRESS=127.0.0.1:" in line
        assert "--xla_force_host_platform_device_count=4" in line
        assert "JAX_PLATFORMS=cpu" in line and "gloo" in line
        assert "-m train.main --workdir /tmp/a\\ b --steps=3" in line
    assert (
        procs[0].split("JAX_COORDINATOR_ADDRESS=")[1][:20]
        == (procs[1].split("JAX_COORDINATOR_ADDRESS=")[1][:20])
    )


@pytest.mark.parametrize("args", [[], ["2"], ["0", "4"], ["two", "4"], ["2", "-1"]])
def test_local_bad_arguments_print_usage(args):
    r = sh("launch/local.sh", *args)
    assert r.returncode == 2
    assert "usage: " in r.stderr


# ------------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_pod_dry_run():
    r = sh(
        "launch/tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "us-east5-a",
        "--type", "v5p-512", "--project", "proj", "--",
        "--config", "configs/x.py", "--config.mesh.fsdp=64",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    check, *cmds = [x[2:] for x in r.stdout.splitlines() if x.startswith("+ ")]
    assert "-m launch.compile --topology v5p-512 --num_slices 1 --config configs/x.py" in check
    assert check.endswith("--config.mesh.fsdp=64 ")
    assert cmds[0].startswith("gcloud --project proj compute tpus tpu-vm create pod")
    assert "--accelerator-type v5p-512" in cmds[0] and "--version v2-alpha-tpuv5" in cmds[0]
    assert "git\\ ls-files" in cmds[1] and "tar" in cmds[1]
    assert "tpu-vm scp" in cmds[2] and "--worker=all" in cmds[2]
    assert "tpu-vm ssh pod" in cmds[3] and "pip\\ install" in cmds[3]
    assert "--worker=all" in cmds[4] and "-m\\ train.main\\ --config\\ configs/x.py" in cmds[4]
    assert "--config.mesh.fsdp=64" in cmds[4] and "QWEN35_DISTRIBUTED=1" in cmds[4]
    assert len(cmds) == 5


@pytest.mark.parametrize("rc, says", [(1, "does not fit v5p-64"), (2, "launch.compile failed")])
def test_tpu_pod_refuses_when_the_compile_check_fails(tmp_path, rc, says):
    """Nothing is created (no gcloud on PATH would fail differently) when launch.compile says
    the step does not fit (exit 1) or the config is bad (exit 2)."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "compile $*"\nexit {rc}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "LOCAL_PYTHON": str(fake), "HOME": str(tmp_path)}
    args = ["--name", "p", "--zone", "z", "--type", "v5p-64", "--", "--config", "c.py"]
    r = sh("launch/tpu_pod.sh", *args, env=env)
    assert r.returncode == rc and says in r.stderr and "nothing was created" in r.stderr
    assert "compile -m launch.compile --topology v5p-64 --num_slices 1 --config c.py" in r.stdout
    assert "gcloud" not in r.stdout
    r = sh("launch/tpu_pod.sh", "--dry-run", "--no-compile-check", *args, env=env)
    assert r.returncode == 0 and "launch.compile" not in r.stdout


def test_tpu_pod_reuse_and_multislice():
    common = ["--dry-run", "--name", "p", "--zone", "z", "--type", "v5p-128"]
    r = sh("launch/tpu_pod.sh", *common, "--reuse", "--", "--x=1")
    assert r.returncode == 0 and "create" not in r.stdout
    r = sh("launch/tpu_pod.sh", *common, "--slices", "2", "--spot", "--", "--x=1")
    assert r.returncode == 0, r.stderr
    assert "queued-resources create p" in r.stdout and "--node-count 2" in r.stdout
    assert "ssh p-0 " in r.stdout and "ssh p-1 " in r.stdout and "--spot" in r.stdout


@pytest.mark.parametrize(
    "args", [["--dry-run"], ["--dry-run", "--name", "p", "--zone", "z"], ["--bogus"]]
)
def test_tpu_pod_bad_arguments(args):
    r = sh("launch/tpu_pod.sh", *args)
    assert r.returncode == 2 and "--name" in r.stderr


# --------------------------------------------------------------------------- gpu_slurm.sbatch


def test_gpu_slurm_dry_run_and_outside_slurm():
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_NUM_NODES": "4", "HOME": "/tmp"}
    r = sh("bash", "launch/gpu_slurm.sbatch", "--dry-run", "--config.mesh.expert=8", env=env)
    assert r.returncode == 0, r.stderr
    srun = [x for x in r.stdout.splitlines() if x.startswith("+ srun")]
    assert len(srun) == 1
    assert "--nodes=4 --ntasks-per-node=8" in srun[0]
    assert "-m\\ train.main\\ --config.mesh.expert=8" in srun[0]
    r = sh("bash", "launch/gpu_slurm.sbatch", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


# ---------------------------------------------------------------------------------- planner


def test_plan_issue_example_does_not_fit_and_names_terms(capsys):
    issue = "--model qwen3.5-397b-a17b --mesh fsdp=64,expert=8 --chip v5p --chips 512"
    rc = planner.main([*issue.split(), "--seq_len", "8192", "--global_batch", "1024"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "largest terms: activations saved" in out
    assert "fsdp=64 tensor=1 expert=8" in out and "2 x 8192 tokens" in out


def test_plan_terms_are_consistent():
    cfg = q.get_config("qwen3.5-397b-a17b")
    rt = q.Runtime(remat_policy="full", compute_dtype="bfloat16")
    p = planner.plan(
        cfg, {"fsdp": 32, "expert": 8}, "v5p", 256, 8192, 256, 1.25, loss_chunk=0, runtime=rt
    )
    terms = dict(p.terms)
    params = terms["parameters (float32)"]
    n = sum(x.size for x in jax.tree.leaves(q.abstract_params(cfg)))
    # large weights split 256 ways; norms, gates and the 1152-wide vision weights (1152 is not
    # divisible by 256, so only by fsdp=32) are replicated more
    assert 4 * n / 256 < params < 1.05 * 4 * n / 256
    assert terms["AdamW m, v (float32)"] == pytest.approx(2 * params)
    assert p.fits and p.total < planner.CHIPS["v5p"][0]
    # one sequence per device; logits [8192, 248320] f32 and their gradient, main + MTP head
    assert terms["logits + gradient, float32 (2 heads)"] == 2 * 2 * 4 * 8192 * 248320
    # chunked cross-entropy (the presets' train.loss_chunk=1024): one chunk of one row, one head
    chunked = planner.plan(cfg, {"fsdp": 32, "expert": 8}, "v5p", 256, 8192, 256, 1.25, runtime=rt)
    assert dict(chunked.terms)["logits + gradient, float32 (1 row x 1024)"] == (
        2 * 4 * 1024 * 248320
    )
    # ... and the head [D, vocab] gathered over fsdp x expert for the loss, with its gradient
    head = 2 * 4096 * 248320 * 2
    assert dict(chunked.terms)["LM head gathered for the loss + its gradient (bfloat16)"] == head
    assert chunked.total == pytest.approx(
        p.total - 2 * 2 * 4 * 8192 * 248320 + 2 * 4 * 1024 * 248320 + head
    )


def test_plan_keeps_every_residual_of_the_mtp_layer():
    """mtp.py's layers are plain DecoderLayers, never rematerialised: under any remat policy
    the planner counts their full residuals (the TPU compiler keeps them: bench/RESULTS.md)."""
    from qwen35_jax.layers import decoder

    cfg = q.get_config("tiny-moe")
    c = cfg.text_config
    assert c.mtp_num_hidden_layers == 1
    rt = q.Runtime(remat_policy="full", compute_dtype="bfloat16")

    def saved(mtp):
        p = planner.plan(cfg, {"fsdp": 4}, "v5p", 4, 256, 8, mtp=mtp, runtime=rt)
        return next(b for name, b in p.terms if name.startswith("activations saved"))

    full, _ = planner.layer_activation_bytes(
        c, decoder.FULL, "none", 2, 256, 1, rt.gdn_chunk_size, rt.dtype, rt.weights_dtype, 4
    )
    kept, _ = planner.layer_activation_bytes(
        c, decoder.FULL, "full", 2, 256, 1, rt.gdn_chunk_size, rt.dtype, rt.weights_dtype, 4
    )
    assert full > 2 * kept
    assert saved(True) - saved(False) == pytest.approx(full)


def test_plan_rejects_a_mesh_that_does_not_match_the_chips(capsys):
    args = "--model qwen3.5-35b-a3b --mesh fsdp=4,expert=4 --chip v5p --chips 32"
    rc = planner.main([*args.split(), "--seq_len", "4096", "--global_batch", "32"])
    assert rc == 2 and "use 16 devices, 32 are present" in capsys.readouterr().err


def test_local_prefers_the_active_virtualenv_and_documents_python(tmp_path):
    import os
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    base = {"PATH": "/usr/bin:/bin", "JAX_COORDINATOR_PORT": "12345", "HOME": str(tmp_path)}
    r = sh("launch/local.sh", "--dry-run", "2", "1", env={**base, "VIRTUAL_ENV": str(venv)})
    assert r.returncode == 0, r.stderr
    assert f"{venv}/bin/python -m train.main" in r.stdout
    r = sh("launch/local.sh", "--dry-run", "2", "1",
           env={**base, "VIRTUAL_ENV": str(venv), "PYTHON": "/opt/py/bin/python3"})  # fmt: skip
    assert "/opt/py/bin/python3 -m train.main" in r.stdout and str(venv) not in r.stdout
    usage = sh("launch/local.sh").stderr
    assert "PYTHON=" in usage and "VIRTUAL_ENV" in usage
    for name in {w for w in usage.split() if w.startswith("--config=configs/")}:
        assert os.path.exists(ROOT / name.split("=", 1)[1]), name  # the usage's configs exist


def test_local_stops_every_process_when_one_dies(tmp_path):
    """Process 1 exits 3; process 0 ignores SIGTERM: the launch ends within seconds, status 3."""
    import time

    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LAUNCH_MODULE": "tests.launch_stub",
        "LAUNCH_LOGDIR": str(tmp_path),
        "LAUNCH_KILL_GRACE": "1",
    }
    t0 = time.monotonic()
    r = sh("launch/local.sh", "2", "1", env=env)
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - t0 < 20
    assert "a process failed (exit 3)" in r.stderr


def test_local_propagates_a_failing_process(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LAUNCH_MODULE": "no_such_module", "HOME": str(tmp_path)}
    r = sh("launch/local.sh", "2", "1", env={**env, "LAUNCH_LOGDIR": str(tmp_path)})
    assert r.returncode == 1
    assert "a process failed" in r.stderr and "No module named no_such_module" in r.stderr
