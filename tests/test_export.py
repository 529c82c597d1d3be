"""The way out: a `train.main` checkpoint exported with `orbax-to-hf` loads in transformers and
gives the logits of `qwen35_jax.forward` on the trained parameters (float32, 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import qwen35_jax
from train.init import params_from_training_checkpoint as restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, "-m", "train.main", f"--config={TINY}", f"--workdir={w}"]
    cmd += ["--config.train.steps=4", "--config.checkpoint.every_steps=2"]
    cmd += ["--config.train.completion_tokens=0", "--config.optimizer.warmup_steps=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return w


def export(ckpt, out, *extra):
    cmd = [sys.executable, "-m", "qwen35_jax.convert", "orbax-to-hf", "--ckpt", ckpt]
    cmd += ["--out", out, "--no_progress", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def trained(workdir, step):
    with open(os.path.join(workdir, "config.json")) as f:
        model = json.load(f)["model"]
    cfg = qwen35_jax.Qwen35Config.from_dict(model)
    abstract = jax.tree.map(
        lambda b: b.value, qwen35_jax.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "value")
    )
    return cfg, restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)


def hf_logits(out, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_exported_run_gives_the_logits_of_forward(workdir, tmp_path):
    out = str(tmp_path / "hf")
    r = export(workdir, out)
    assert r.returncode == 0, r.stderr
    cfg, params = trained(workdir, 4)  # the workdir's newest step
    ids = np.array([[5, 17, 3, 250, 9, 1, 77, 42, 8, 300, 11, 2]], np.int32)
    ours = np.asarray(qwen35_jax.forward(cfg, params, ids))
    np.testing.assert_allclose(hf_logits(out, ids), ours, atol=1e-5, rtol=1e-5)
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer.model", "TOKENIZER.md", "model.safetensors.index.json"} <= (
        files
    )
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["dtype"] == "float32" and hf["architectures"] == ["Qwen3_5MoeForCausalLM"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_step_dir_exports_that_step_in_bfloat16(workdir, tmp_path):
    out = str(tmp_path / "hf2")
    r = export(os.path.join(workdir, "checkpoints", "2"), out, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    cfg, params = trained(workdir, 2)
    from qwen35_jax.convert.safetensors_io import SafetensorsFile

    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        name = json.load(f)["weight_map"]["model.embed_tokens.weight"]
    st = SafetensorsFile(os.path.join(out, name))
    emb = np.asarray(st.get("model.embed_tokens.weight"), np.float32)
    want = np.asarray(params["embed_tokens"]).astype(jax.numpy.bfloat16)
    np.testing.assert_array_equal(emb, np.asarray(want, np.float32))


def test_export_refuses_a_directory_that_is_no_checkpoint(tmp_path):
    r = export(str(tmp_path), str(tmp_path / "out"))
    assert r.returncode == 1 and "train.main workdir" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "out")
