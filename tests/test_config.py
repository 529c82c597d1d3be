"""Tests for qwen35_jax.config: presets, validation, our dict form and HF config.json interop."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
import transformers

from qwen35_jax.config import (
    ConfigError,
    Qwen35Config,
    RopeParameters,
    TextConfig,
    VisionConfig,
)
from qwen35_jax.hf_config import from_hf as config_from_hf
from qwen35_jax.hf_config import to_hf as config_to_hf
from qwen35_jax.presets import PRESETS, get_config
from qwen35_jax.runtime import Runtime

REAL = (
    "qwen3.5-0.8b",
    "qwen3.5-2b",
    "qwen3.5-4b",
    "qwen3.5-9b",
    "qwen3.5-27b",
    "qwen3.5-35b-a3b",
    "qwen3.5-122b-a10b",
    "qwen3.5-397b-a17b",
)
SMALL_TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    max_position_embeddings=512,
    eos_token_id=7,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
)
SMALL_MOE = dict(
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)
SMALL_VISION = dict(
    depth=2,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=32,
    num_position_embeddings=16,
)


# ---- presets ----
def test_preset_names():
    assert PRESETS[:8] == REAL
    assert {"tiny", "tiny-moe", "tiny-vl"} <= set(PRESETS[8:])
    with pytest.raises(ConfigError, match=r"'nope'.*qwen3\.5-0\.8b.*tiny-moe"):
        get_config("nope")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_is_hashable(name):
    c = get_config(name)
    assert c == dataclasses.replace(c)  # re-runs every __post_init__
    assert hash(c) == hash(Qwen35Config.from_dict(c.to_dict()))
    t = c.text
    assert t.layer_types[t.full_attention_interval - 1] == "full_attention"
    if name in REAL:
        assert (t.vocab_size, t.head_dim, t.rope_parameters.rope_theta) == (248320, 256, 1e7)
        assert t.rope_parameters.mrope_section == (11, 11, 10) and t.mtp_num_hidden_layers == 1
        assert t.eos_token_id == 248044 and t.max_position_embeddings == 262144
        assert c.vision_config.out_hidden_size == t.hidden_size
        assert c.is_moe == name.endswith(("a3b", "a10b", "a17b"))


def test_preset_values_from_design_table():
    c = get_config("qwen3.5-397b-a17b").text
    assert (c.hidden_size, c.num_hidden_layers, c.num_experts, c.num_experts_per_tok) == (
        4096,
        60,
        512,
        10,
    )
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size) == (1024, 1024)
    assert (c.num_attention_heads, c.num_key_value_heads, c.linear_num_value_heads) == (32, 2, 64)
    c = get_config("qwen3.5-27b").text
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads) == (5120, 17408, 24)
    assert not c.tie_word_embeddings and get_config("qwen3.5-0.8b").text.tie_word_embeddings
    assert get_config("qwen3.5-0.8b").vision_config.depth == 12
    assert get_config("qwen3.5-27b").text.num_blocks == 16
    tiny = get_config("tiny")
    assert tiny.vision_config is None and tiny.text.rope_parameters.rope_theta == 10000.0
    assert get_config("tiny-moe").is_moe and not get_config("tiny-moe").text.tie_word_embeddings
    vl = get_config("tiny-vl")
    assert vl.vision_config.out_hidden_size == vl.text.hidden_size
    assert max(vl.image_token_id, vl.video_token_id) < vl.text.vocab_size


def test_layer_types_and_tail():
    t = TextConfig(num_hidden_layers=6, full_attention_interval=4)
    assert (
        t.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 2
    )
    assert (t.num_blocks, t.num_tail_layers) == (1, 2)


def test_jit_static_argument():
    f = jax.jit(lambda x, cfg: x * cfg.text.hidden_size, static_argnums=1)
    assert int(f(1, get_config("tiny"))) == 64


# ---- validation ----
@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(num_attention_heads=6),
            r"text_config\.num_attention_heads=6 must be divisible by "
            r"text_config\.num_key_value_heads=4",
        ),
        (dict(linear_num_value_heads=24), r"linear_num_value_heads=24 .*linear_num_key_heads=16"),
        (dict(hidden_size=0), r"text_config\.hidden_size=0 must be > 0"),
        (dict(full_attention_interval=0), r"full_attention_interval=0"),
        (dict(num_hidden_layers=2), r"full_attention_interval=4 must be <= .*num_hidden_layers=2"),
        (dict(head_dim=20), r"head_dim=20 \* .*partial_rotary_factor=0.25 = 5.0 must be"),
        (
            dict(
                num_experts=4,
                num_experts_per_tok=5,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=8,
            ),
            r"num_experts_per_tok=5 must be in \[1, ",
        ),
        (
            dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
            r"shared_expert_intermediate_size=0 must be > 0",
        ),
        (dict(moe_intermediate_size=8), r"moe_intermediate_size=8 must be 0 for a dense model"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu' must be 'silu'"),
        (dict(mtp_use_dedicated_embeddings=True), r"mtp_use_dedicated_embeddings=True is not supp"),
        (dict(hidden_size=True), r"text_config\.hidden_size=True must be an int"),
        (dict(hidden_size=64.5), r"text_config\.hidden_size=64.5 must be an int"),
        (dict(rms_norm_eps="1e-6"), r"text_config\.rms_norm_eps='1e-6' must be a finite number"),
        (dict(eos_token_id=-1), r"text_config\.eos_token_id=-1 must be >= 0"),
        (dict(rope_parameters={"rope_theta": 1.0}), r"text_config\.rope_parameters must be a Rope"),
    ],
)
def test_text_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TextConfig(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rope_type="yarn"), r"rope_parameters\.rope_type='yarn' is not supported"),
        (dict(rope_theta=0), r"rope_parameters\.rope_theta=0.0 must be > 0"),
        (dict(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5 must be in \(0, 1\]"),
        (dict(mrope_section=(11, -1, 10)), r"mrope_section\[1\]=-1 must be >= 0"),
        (dict(mrope_section=(11, 1.5)), r"mrope_section\[1\]=1.5 must be an int"),
    ],
)
def test_rope_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        RopeParameters(**kw)


def test_top_and_vision_validation():
    with pytest.raises(ConfigError, match=r"vision_config\.hidden_size=30 .*num_heads=16"):
        VisionConfig(hidden_size=30)
    with pytest.raises(ConfigError, match=r"out_hidden_size=3584 must equal .*hidden_size=4096"):
        Qwen35Config(vision_config=VisionConfig())
    c = get_config("tiny")
    for kw, match in [
        (dict(extra=(("a", "{"),)), "extra\\['a'\\]='{' must be a JSON"),
        (dict(nope=1), "unknown key 'nope'; valid keys: .*text_config"),
        (dict(remat_policy="full"), "unknown key 'remat_policy'"),  # a runtime setting
    ]:
        with pytest.raises(ConfigError, match=match):
            c.replace(**kw)


def test_runtime_validation():
    rt = Runtime()
    for kw, match in [
        (dict(compute_dtype="float16"), "runtime.compute_dtype='float16' must be one of"),
        (dict(remat_policy="some"), "runtime.remat_policy='some' must be one of"),
        (dict(gdn_chunk_size=0), "runtime.gdn_chunk_size=0 must be an int >= 1"),
        (dict(moe_dispatch="ragged"), "runtime.moe_dispatch='ragged' must be one of"),
        (dict(moe_capacity_factor=-1.0), "runtime.moe_capacity_factor=-1.0 must be >= 0"),
        (dict(attention_block_q=0), "runtime.attention_block_q=0 must be an int >= 1"),
        (dict(nope=1), "unknown key 'runtime.nope'; valid keys: .*remat_policy"),
    ]:
        with pytest.raises(ConfigError, match=match):
            rt.replace(**kw)
    r = rt.replace(remat_policy="dots", compute_dtype="bfloat16", gdn_chunk_size=48.0)
    assert (r.remat_policy, r.gdn_chunk_size, r.dtype) == ("dots", 48, jnp.bfloat16)
    assert type(r.gdn_chunk_size) is int and hash(r) == hash(Runtime.from_dict(r.to_dict()))


def test_normalisation():
    t = TextConfig(
        hidden_size=4096.0,
        rope_parameters=RopeParameters(rope_theta=10_000_000, mrope_section=[11, 11, 10]),
    )
    assert t == TextConfig() and type(t.hidden_size) is int
    assert type(t.rope_parameters.rope_theta) is float
    assert t.rope_parameters.mrope_section == (11, 11, 10)


# ---- our dict form ----
@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip(name):
    c = get_config(name).replace(extra=(("dtype", '"bfloat16"'),))
    d = c.to_dict()
    assert Qwen35Config.from_dict(d) == c
    assert Qwen35Config.from_dict(json.loads(json.dumps(d))) == c


def test_from_dict_partial_and_strict():
    c = Qwen35Config.from_dict(
        {
            "text_config": {
                "hidden_size": 64.0,
                "num_hidden_layers": 8,
                "rope_parameters": {"rope_theta": 1e4},
            },
            "vision_config": None,
        }
    )
    assert c.text.hidden_size == 64 and c.text.rope_parameters.rope_theta == 1e4
    assert c.text.num_attention_heads == TextConfig.num_attention_heads
    for bad, key in [
        ({"text_config": {"hiden_size": 1}}, "'text_config.hiden_size'"),
        ({"text_config": {"rope_parameters": {"theta": 1}}}, "'text_config.rope_parameters.theta'"),
        ({"vision_config": {"dpeth": 1}}, "'vision_config.dpeth'"),
        ({"remat": "full"}, "'remat'"),
    ]:
        with pytest.raises(ConfigError, match=f"unknown key {key}; valid keys: \\["):
            Qwen35Config.from_dict(bad)
    with pytest.raises(ConfigError, match=r"text_config\.num_hidden_layers='8' must be an int"):
        Qwen35Config.from_dict({"text_config": {"num_hidden_layers": "8"}})
    with pytest.raises(ConfigError, match="text_config must be a TextConfig, got int 3"):
        Qwen35Config.from_dict({"text_config": 3})


# ---- Hugging Face config.json ----
@pytest.mark.parametrize("name", PRESETS)
def test_hf_round_trip(name):
    c = get_config(name)
    d = json.loads(json.dumps(config_to_hf(c)))
    assert config_from_hf(d) == c
    t = d.get("text_config", d)
    assert t["layer_types"] == list(c.text.layer_types)
    assert ("num_experts" in t) == c.is_moe
    assert ("intermediate_size" in t) == (not c.is_moe or c.text.intermediate_size != 12288)
    if c.vision_config is None:
        assert "text_config" not in d and d["model_type"].endswith("_text")
        assert d["architectures"][0].endswith("ForCausalLM")
    else:
        assert d["model_type"] in ("qwen3_5", "qwen3_5_moe")
        assert d["vision_config"]["model_type"] == d["model_type"] + "_vision"
        assert d["tie_word_embeddings"] == t["tie_word_embeddings"]


def test_hf_round_trip_text_only_token_ids():
    c = get_config("tiny-moe").replace(image_token_id=5, extra=(("dtype", '"float32"'),))
    d = config_to_hf(c)
    assert d["image_token_id"] == 5 and "video_token_id" not in d and d["dtype"] == "float32"
    assert config_from_hf(d) == c.replace(extra=(("text_config.dtype", '"float32"'),))


def _hf_configs():
    tc = transformers.Qwen3_5TextConfig(
        **SMALL_TEXT, intermediate_size=40, tie_word_embeddings=True
    )
    mtc = transformers.Qwen3_5MoeTextConfig(**SMALL_TEXT, **SMALL_MOE)
    vl = transformers.Qwen3_5Config(
        text_config={**SMALL_TEXT, "intermediate_size": 40},
        vision_config=SMALL_VISION,
        tie_word_embeddings=True,
        image_token_id=90,
    )
    mvl = transformers.Qwen3_5MoeConfig(
        text_config={**SMALL_TEXT, **SMALL_MOE}, vision_config=SMALL_VISION
    )
    return {"text": tc, "moe_text": mtc, "vl": vl, "moe_vl": mvl}


def _check_against_hf(c, hf):
    t = hf.get_text_config()
    assert c.is_moe == hasattr(t, "num_experts")
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_conv_kernel_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
    ):
        assert getattr(c.text, name) == getattr(t, name), name
    assert list(c.text.layer_types) == list(t.layer_types)
    rope = t.rope_parameters
    assert c.text.rope_parameters.rope_theta == rope["rope_theta"]
    assert c.text.rope_parameters.partial_rotary_factor == rope["partial_rotary_factor"]
    assert list(c.text.rope_parameters.mrope_section) == rope.get("mrope_section", [11, 11, 10])
    if c.is_moe:
        for name in SMALL_MOE:
            assert getattr(c.text, name) == getattr(t, name), name
    else:
        assert c.text.intermediate_size == t.intermediate_size
    vision = getattr(hf, "vision_config", None)
    assert (c.vision_config is None) == (vision is None)
    if vision is not None:
        assert c.text.tie_word_embeddings == hf.tie_word_embeddings
        assert c.image_token_id == hf.image_token_id
        for name in SMALL_VISION:
            assert getattr(c.vision_config, name) == getattr(vision, name), name
    else:
        assert c.text.tie_word_embeddings == t.tie_word_embeddings


@pytest.mark.parametrize("kind", ["text", "moe_text", "vl", "moe_vl"])
def test_hf_interop(kind, tmp_path):
    hf = _hf_configs()[kind]
    c = config_from_hf(hf.to_dict())
    _check_against_hf(c, hf)
    hf.save_pretrained(tmp_path)  # writes only the keys that differ from the class defaults
    from_file = config_from_hf(tmp_path)
    assert from_file.text == c.text and from_file.vision_config == c.vision_config
    assert config_from_hf(tmp_path / "config.json") == from_file
    # ours -> config.json -> transformers
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(c)))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(hf)
    _check_against_hf(c, back)
    assert config_from_hf(back.to_dict()) == c


def test_released_style_config():
    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    d = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "tie_word_embeddings": True,
        "transformers_version": "4.57.0.dev0",
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "text_config": {
            "model_type": "qwen3_5_text",
            "attn_output_gate": True,
            "dtype": "bfloat16",
            "eos_token_id": 248044,
            "full_attention_interval": 4,
            "head_dim": 256,
            "hidden_act": "silu",
            "hidden_size": 1024,
            "intermediate_size": 3584,
            "layer_types": layer_types * 6,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 16,
            "linear_value_head_dim": 128,
            "mamba_ssm_dtype": "float32",
            "max_position_embeddings": 262144,
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": 8,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "partial_rotary_factor": 0.25,
            "rms_norm_eps": 1e-06,
            "tie_word_embeddings": False,
            "vocab_size": 248320,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": [11, 11, 10],
                "partial_rotary_factor": 0.25,
                "rope_theta": 10000000,
                "rope_type": "default",
            },
        },
        "vision_config": {
            "model_type": "qwen3_5",
            "depth": 12,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_heads": 12,
            "out_hidden_size": 1024,
            "initializer_range": 0.02,
        },
    }
    c = config_from_hf(d)
    assert c.text_config == get_config("qwen3.5-0.8b").text_config  # top-level tie wins
    assert c.vision_config == get_config("qwen3.5-0.8b").vision_config
    assert dict(c.extra) == {
        "text_config.attn_output_gate": "true",
        "text_config.dtype": '"bfloat16"',
        "text_config.mamba_ssm_dtype": '"float32"',
        "vision_config.initializer_range": "0.02",
    }
    out = config_to_hf(c)
    assert out["text_config"]["mamba_ssm_dtype"] == "float32"
    assert out["vision_config"]["initializer_range"] == 0.02
    assert config_from_hf(out) == c


def test_old_rope_keys_and_defaults():
    d = {
        "model_type": "qwen3_5_moe_text",
        "num_hidden_layers": 8,
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    }
    t = config_from_hf(d).text
    assert t.rope_parameters == RopeParameters(
        rope_theta=1e6, partial_rotary_factor=0.5, mrope_section=(8, 12, 12)
    )
    # absent keys take the transformers class defaults for the model type
    assert (t.hidden_size, t.num_key_value_heads, t.num_experts, t.max_position_embeddings) == (
        2048,
        2,
        256,
        32768,
    )
    assert config_from_hf({"model_type": "qwen3_5_text"}).text.rope_parameters == (
        RopeParameters(rope_theta=10000.0)
    )


def test_extra_round_trip_all_sections():
    c = config_from_hf(
        {
            "model_type": "qwen3_5_moe",
            "quantization_config": {"bits": 4},
            "text_config": {
                "hidden_size": 32,
                "head_dim": 8,
                "num_hidden_layers": 4,
                "foo": [1],
                "rope_parameters": {"rope_theta": 5.0, "bar": 2},
            },
            "vision_config": {"out_hidden_size": 32, "dtype": None},
        }
    )
    assert dict(c.extra) == {
        "quantization_config": '{"bits": 4}',
        "text_config.foo": "[1]",
        "text_config.rope_parameters.bar": "2",
        "vision_config.dtype": "null",
    }
    out = config_to_hf(c)
    assert out["quantization_config"] == {"bits": 4} and out["text_config"]["foo"] == [1]
    assert out["text_config"]["rope_parameters"]["bar"] == 2
    assert out["vision_config"]["dtype"] is None
    assert config_from_hf(out) == c


@pytest.mark.parametrize(
    "layer_types, match",
    [
        (
            ["linear_attention", "full_attention"] + ["linear_attention"] * 6,
            r"layer_types\[3\]='linear_attention' does not follow the full_attention_interval=2",
        ),
        (["linear_attention"] * 3 + ["full_attention"] * 5, r"layer_types\[4\]='full_attention'"),
        (["linear_attention"] * 8, r"layer_types=.* has no 'full_attention' layer"),
        (["linear_attention"] * 3 + ["full_attention"], r"layer_types has 4 entries but .*=8"),
        (
            ["linear_attention"] * 3
            + ["full_attention", "sliding_attention"]
            + ["linear_attention"] * 3,
            r"layer_types\[4\]='sliding_attention'",
        ),
    ],
)
def test_bad_layer_types(layer_types, match):
    d = {
        "model_type": "qwen3_5",
        "text_config": {"num_hidden_layers": 8, "hidden_size": 3584, "layer_types": layer_types},
    }
    with pytest.raises(ConfigError, match=r"text_config\." + match):
        config_from_hf(d)


def test_from_hf_rejects():
    with pytest.raises(ConfigError, match=r"model_type='llama' is not a Qwen3\.5 config"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match=r"text_config\.num_experts=8 in a dense config"):
        config_from_hf({"model_type": "qwen3_5_text", "num_experts": 8})
    with pytest.raises(ConfigError, match=r"mtp_use_dedicated_embeddings=True is not supported"):
        config_from_hf({"model_type": "qwen3_5_text", "mtp_use_dedicated_embeddings": True})
    with pytest.raises(ConfigError, match=r"eos_token_id=\[1, 2\] must be an int"):
        config_from_hf({"model_type": "qwen3_5_text", "eos_token_id": [1, 2]})
    with pytest.raises(ConfigError, match=r"at index 3 but text_config\.full_attention_interval=2"):
        config_from_hf(
            {
                "num_hidden_layers": 4,
                "full_attention_interval": 2,
                "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            }
        )
