"""Every config file loads, validates and documents its command; the schema's checks name keys."""

from __future__ import annotations

import glob
import json
import os
import runpy

import pytest

import qwen35_jax
from train import config_schema
from train.rl import config as rl_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(  # the experiment configs (common.py is the recipe they share, not one)
    f
    for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not f.endswith(("__init__.py", "common.py"))
)


def test_there_is_a_config_per_released_preset():
    names = {os.path.basename(f)[:-3] for f in FILES}
    for preset in qwen35_jax.PRESETS:
        if preset.startswith("qwen3.5-"):
            assert (
                preset.replace("qwen3.5-", "qwen3_5_").replace("-", "_").replace(".", "_") in names
            ), preset
    assert {"default", "tiny_cpu"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_file_validates_and_shows_its_command(path):
    module = runpy.run_path(path)
    name = os.path.basename(path)
    entry = "train.rl" if name.startswith("rl_") else "train.main"  # the RL configs' own CLI
    assert f"python -m {entry} --config=configs/{name}" in module["__doc__"] or name == "default.py"
    assert "python -m train.main" in module["__doc__"]
    config = module["get_config"]()
    if config.data.kind != "stdlib":
        config.data.path = "/data/train-*.array_record"
        config.data.tokenizer_path = "/ckpt/tokenizer.json"
    model = (rl_config.validate if entry == "train.rl" else config_schema.validate)(config)
    # text pretraining drops the vision tower; multimodal data kinds keep it
    assert (model.vision_config is None) == (config.data.kind not in config_schema.MULTIMODAL_KINDS)
    json.loads(config_schema.resolved_json(config, model))
    assert (
        config.model.text_config.vocab_size >= config.data.vocab_size
        or config.data.tokenizer == "hf"
    )


def test_preset_configs_keep_the_released_architecture():
    config = runpy.run_path(os.path.join(ROOT, "configs", "qwen3_5_35b_a3b.py"))["get_config"]()
    model = config_schema.model_config(config)
    want = qwen35_jax.get_config("qwen3.5-35b-a3b")
    assert model.text_config == want.text_config
    runtime = config_schema.runtime_config(config)
    assert runtime.compute_dtype == "bfloat16" and runtime.param_dtype == "float32"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.batch_size", 6, "train.batch_size=6 must be divisible by train.grad_accum=4"),
        ("optimizer.schedule", "linear", "optimizer.schedule='linear' must be one of"),
        ("optimizer.b2", 1.0, "optimizer.b2=1.0 must be in [0, 1)"),
        ("mesh.tensor", 0, "mesh.tensor=0 must be a positive size or -1"),
        ("data.kind", "csv", "data.kind='csv' must be one of"),
        ("data.path", "gs://b/train-*.jsonl", "data.path='gs://b/train-*.jsonl' must be a local"),
        ("runtime.remat_policy", "some", "runtime.remat_policy='some' must be one of"),
        ("model.remat_policy", "full", "model.remat_policy moved to runtime.remat_policy"),
    ],
)
def test_validation_names_the_key(key, value, message):
    config = config_schema.base_config()
    config.train.grad_accum = 4
    config.train.batch_size = 8
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_schema.ConfigValueError) as e:
        config_schema.validate(config)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(sequence=3), "train.seq_len=256 must split over mesh.sequence=3"),
        (dict(sequence=128), "train.seq_len=256 must split over mesh.sequence=128"),  # 2 < 3
        (dict(expert=3), "model.text_config.num_experts=8 must be divisible by mesh.expert=3"),
    ],
)
def test_parallel_splits_are_checked_up_front(mesh, message):
    """Bug 5: no silent replicated fallback for a training shape (tiny-moe: 8 experts, conv 4)."""
    config = config_schema.base_config("tiny-moe")
    config.mesh.update(fsdp=1, **mesh)
    with pytest.raises(config_schema.ConfigValueError) as e:
        config_schema.validate(config)
    assert message in str(e.value)
    config.runtime.moe_dispatch = "local"  # the replicated path chosen on purpose
    if "expert" in mesh:
        config_schema.validate(config)


def test_moved_runtime_override_names_the_new_key():
    from train import main

    argv = ["main", "--config.model.gdn_chunk_size=16"]
    assert main.unknown_override(argv) == "model.gdn_chunk_size moved to runtime.gdn_chunk_size"


def test_model_overrides_reach_the_model_config():
    config = config_schema.base_config("tiny-moe")
    config.model.text_config.num_hidden_layers = 8
    config.model.text_config.full_attention_interval = 2
    config.model.text_config.num_experts = 16
    config.model.text_config.mtp_num_hidden_layers = 0
    config.model.text_config.eos_token_id = 7
    model = config_schema.validate(config)
    t = model.text_config
    assert (
        t.num_hidden_layers,
        t.full_attention_interval,
        t.num_experts,
        t.mtp_num_hidden_layers,
        t.eos_token_id,
    ) == (8, 2, 16, 0, 7)


def test_mesh_must_fit_the_devices():
    config = config_schema.base_config()
    config.mesh.fsdp, config.mesh.data = 3, 1
    with pytest.raises(config_schema.ConfigValueError, match="mesh"):
        config_schema.mesh_devices_check(config, 8)
    config.mesh.fsdp, config.train.batch_size = -1, 4
    with pytest.raises(config_schema.ConfigValueError, match="train.batch_size"):
        config_schema.mesh_devices_check(config, 8)
