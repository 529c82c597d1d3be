"""Bad input gets a clear error naming the field, key or file."""

import json
import os

import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from tests import hf_oracle


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(q.ConfigError, match="qwen3.5-0.8b"):
        q.get_config("qwen3.5-1b")


def test_heads_not_divisible_names_both_fields():
    text = q.get_config("tiny").text_config
    with pytest.raises(q.ConfigError, match="num_attention_heads.*num_key_value_heads"):
        text.__class__(**{**text.__dict__, "num_attention_heads": 6, "num_key_value_heads": 4})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf_oracle.save(hf_oracle.build(num_hidden_layers=4), path)
    return str(path)


def _rewrite(src: str, dst, edit) -> str:
    """Copy a checkpoint dir, letting `edit` change the tensor dict of model.safetensors."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    edit(tensors)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return str(dst)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    key = "model.layers.1.linear_attn.in_proj_z.weight"
    path = _rewrite(checkpoint, tmp_path, lambda t: t.pop(key))
    with pytest.raises(q.CheckpointError, match=r"missing \(1\)[\s\S]*" + key.replace(".", r"\.")):
        q.load_hf(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    key = "model.layers.3.self_attn.k_proj.weight"

    def edit(t):
        t[key] = np.zeros((t[key].shape[0] + 1, t[key].shape[1]), np.float32)

    path = _rewrite(checkpoint, tmp_path, edit)
    with pytest.raises(q.CheckpointError, match=key.replace(".", r"\.") + ": expected"):
        q.load_hf(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = _rewrite(checkpoint, tmp_path, lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(q.CheckpointError, match=r"unexpected \(1\)[\s\S]*extra"):
        q.load_hf(path)


def test_truncated_shard_names_the_file(checkpoint, tmp_path):
    path = _rewrite(checkpoint, tmp_path, lambda t: None)
    shard = os.path.join(path, "model.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(q.CheckpointError, match="model.safetensors: truncated"):
        q.load_hf(path)


def test_bad_input_shapes_are_named():
    config = q.get_config("tiny")
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="input_ids must be"):
        q.forward(config, {}, ids[0])
    with pytest.raises(ValueError, match="positions must be"):
        q.forward(config, {}, ids, positions=np.zeros((2, 4), np.int32))
