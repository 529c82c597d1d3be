"""The eight released presets under jax.eval_shape: exact parameter counts against transformers.

The reference count comes from the transformers model built on the `meta` device (no memory)
from our config's `to_hf()`; ours from `abstract_params` (no FLOPs). MTP parameters are not
part of the transformers models and are excluded from our count.
"""

import math

import jax
import pytest
import torch
from flax import linen as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import qwen35_jax as q
from qwen35_jax.hf_config import to_hf as config_to_hf

REAL = [name for name in q.PRESETS if not name.startswith("tiny")]
# billions of parameters the names promise (text + vision; MoE: total), to 5% (for text-only
# counts we check against the reference exactly, and the names loosely)
NOMINAL = {
    "qwen3.5-0.8b": 0.8,
    "qwen3.5-2b": 2,
    "qwen3.5-4b": 4,
    "qwen3.5-9b": 9,
    "qwen3.5-27b": 27,
    "qwen3.5-35b-a3b": 35,
    "qwen3.5-122b-a10b": 122,
    "qwen3.5-397b-a17b": 397,
}


def our_count(config) -> int:
    shapes = nn.meta.unbox(q.abstract_params(config))
    shapes = {k: v for k, v in shapes.items() if k != "mtp"}
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def reference_count(hf_dict: dict) -> int:
    hf_config = AutoConfig.for_model(**hf_dict)
    # text-only configs build *ForCausalLM; multimodal ones *ForConditionalGeneration
    auto = AutoModelForImageTextToText if "vision_config" in hf_dict else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", REAL)
def test_text_parameter_count_equals_reference(name):
    config = q.get_config(name).replace(vision_config=None)
    assert our_count(config) == reference_count(config_to_hf(config))


@pytest.mark.parametrize("name", REAL)
def test_multimodal_parameter_count_equals_reference(name):
    """Text + vision tower + merger = transformers' Qwen3_5(Moe)ForConditionalGeneration."""
    config = q.get_config(name)
    assert config.vision_config is not None
    assert our_count(config) == reference_count(config_to_hf(config))


def test_the_eight_presets_exist():
    assert len(REAL) == 8 and set(REAL) == set(NOMINAL)


@pytest.mark.parametrize("name", REAL)
def test_mtp_parameters_exist(name):
    shapes = nn.meta.unbox(q.abstract_params(q.get_config(name)))
    assert "mtp" in shapes and shapes["mtp"]["fc"].shape[0] == 2 * shapes["mtp"]["fc"].shape[1]
