"""Qwen3.5 configs <-> Hugging Face ``config.json``: ``from_hf`` and ``to_hf``.

Field map (ours -> Hugging Face ``config.json``; most names are identical):

* ``TextConfig`` -> ``text_config`` (multimodal) or the top level (text-only ``*ForCausalLM``).
  ``full_attention_interval`` -> ``layer_types`` (written in full; read back and checked to follow
  the pattern ``full_attention`` at every ``interval``-th layer, linear attention elsewhere).
  ``rope_parameters`` -> ``rope_parameters`` {rope_type, rope_theta, partial_rotary_factor,
  mrope_section, mrope_interleaved}; older ``rope_theta``/``partial_rotary_factor`` keys and a
  ``rope_scaling`` dict are read too. MoE keys (num_experts, num_experts_per_tok,
  moe_intermediate_size, shared_expert_intermediate_size) are read only for MoE configs and
  written only for MoE models (``num_experts > 0``); ``intermediate_size`` is not carried by the
  released MoE configs and is written for MoE only when it differs from the default.
  ``mtp_num_hidden_layers`` / ``mtp_use_dedicated_embeddings`` are the released MTP keys.
* ``VisionConfig`` -> ``vision_config`` (``None`` for text-only models).
* ``Qwen35Config`` top level: the four vision token ids; ``tie_word_embeddings`` lives on the text
  config here and is written at both levels (when read, the top-level value wins).
* Runtime settings (dtypes, remat, kernel sizes, MoE dispatch) are not part of the config:
  they are `runtime.Runtime`, given to the model functions separately.
* ``extra``: HF keys we do not model (``dtype``, ``mamba_ssm_dtype``, ``attn_output_gate``,
  ``initializer_range``, ...), kept as sorted ``(dotted key, JSON string)`` pairs so that
  ``to_hf(from_hf(d))`` keeps them. Keys are ``name`` (top level), ``text_config.name``,
  ``text_config.rope_parameters.name`` or ``vision_config.name``. In a flat text-only file every
  key is a ``text_config.`` key. transformers' private ``_*`` keys (``_name_or_path``) are
  dropped; stray MoE keys in a dense config are ignored, as transformers ignores them.

Keys absent from a config.json take the Hugging Face class defaults of its model type (e.g.
``rope_theta`` 10000, ``max_position_embeddings`` 32768, MoE ``hidden_size`` 2048), so a file
means what it means to ``transformers``; our dataclass defaults are the released-model values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qwen35_jax.config import (
    DENSE_ZERO,
    TOKEN_IDS,
    TOP_DEFAULTS,
    ConfigError,
    Qwen35Config,
    RopeParameters,
    TextConfig,
    VisionConfig,
    as_dict,
    check,
    plain,
)

_MOE_KEYS = ("num_experts", *DENSE_ZERO, "router_aux_loss_coef")
_ROPE_KEYS = (
    "layer_types",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
)
_SKIP = ("architectures", "model_type", "transformers_version")
_HF_DEFAULTS = {  # transformers class defaults where they differ from ours (used by from_hf)
    False: {"max_position_embeddings": 32768},
    True: {
        "max_position_embeddings": 32768,
        "hidden_size": 2048,
        "num_hidden_layers": 40,
        "num_key_value_heads": 2,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
    },
}
_HF_ROPE_THETA = 10_000.0  # transformers' default_theta
_MODEL_TYPES = {
    "qwen3_5_text": False,
    "qwen3_5_moe_text": True,
    "qwen3_5": False,
    "qwen3_5_moe": True,
}
_SECTIONS = ("text_config.rope_parameters.", "text_config.", "vision_config.")


def from_hf(source: dict[str, Any] | str | os.PathLike[str]) -> Qwen35Config:
    """Reads a config.json dict, a path to config.json or a checkpoint directory."""
    if not isinstance(source, dict):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            try:
                source = json.load(f)
            except ValueError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return _from_hf(as_dict(source, "config"))


def to_hf(config: Qwen35Config) -> dict[str, Any]:
    """A config.json dict that transformers loads."""
    t, moe = config.text_config, config.text_config.is_moe
    family = "qwen3_5_moe" if moe else "qwen3_5"
    arch = "Qwen3_5MoeFor" if moe else "Qwen3_5For"
    text = _text_to_hf(t)
    text["model_type"] = family + "_text"
    extra = {k: json.loads(v) for k, v in config.extra}
    ids = {name: getattr(config, name) for name in TOKEN_IDS}
    if config.vision_config is None:
        out = {"architectures": [arch + "CausalLM"], **text}
        out.update({k: v for k, v in ids.items() if v != TOP_DEFAULTS[k]})
        _merge(out, extra, "text_config.")
        _merge(out, extra, "")
        return out
    vision = plain(dataclasses.asdict(config.vision_config))
    if not vision["deepstack_visual_indexes"]:
        del vision["deepstack_visual_indexes"]
    vision["model_type"] = family + "_vision"
    _merge(text, extra, "text_config.")
    _merge(vision, extra, "vision_config.")
    out = {
        "architectures": [arch + "ConditionalGeneration"],
        "model_type": family,
        "text_config": text,
        "vision_config": vision,
        **ids,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    _merge(out, extra, "")
    return out


def _merge(target: dict[str, Any], extra: dict[str, Any], prefix: str) -> None:
    """Adds the ``extra`` entries of one section (modelled keys already in target win)."""
    for key, value in extra.items():
        section = next((s for s in _SECTIONS if key.startswith(s)), "")
        if section == prefix:
            target.setdefault(key[len(prefix) :], value)
        elif section == "text_config.rope_parameters." and prefix == "text_config.":
            target["rope_parameters"].setdefault(key[len(section) :], value)


def _text_to_hf(t: TextConfig) -> dict[str, Any]:
    d = plain(dataclasses.asdict(t))
    if t.is_moe:
        if t.intermediate_size == TextConfig.intermediate_size:
            del d["intermediate_size"]  # released MoE configs do not carry it
    else:
        for name in _MOE_KEYS:
            del d[name]
        if t.router_aux_loss_coef != TextConfig.router_aux_loss_coef:
            d["router_aux_loss_coef"] = t.router_aux_loss_coef
    d["layer_types"] = list(t.layer_types)
    d["partial_rotary_factor"] = t.rope_parameters.partial_rotary_factor
    return d


def _read_layer_types(text: dict[str, Any], n: Any) -> int | None:
    """The full-attention interval implied by ``layer_types`` (checked), or None if absent."""
    lt, p = text.get("layer_types"), "text_config.layer_types"
    if lt is None:
        return None
    if not isinstance(lt, (list, tuple)) or not all(isinstance(x, str) for x in lt):
        raise ConfigError(f"{p}={lt!r} must be a list of layer type strings")
    check(len(lt) == n, f"{p} has {len(lt)} entries but text_config.num_hidden_layers={n}")
    if "full_attention" not in lt:
        raise ConfigError(
            f"{p}={lt!r} has no 'full_attention' layer; expected one every "
            "full_attention_interval layers"
        )
    interval = lt.index("full_attention") + 1
    given = text.get("full_attention_interval", interval)
    check(
        given == interval,
        f"{p} puts the first full_attention layer at index {interval - 1}"
        f" but text_config.full_attention_interval={given!r}",
    )
    for i, kind in enumerate(lt):
        want = "linear_attention" if (i + 1) % interval else "full_attention"
        check(
            kind == want,
            f"{p}[{i}]={kind!r} does not follow the full_attention_interval="
            f"{interval} pattern (expected {want!r}; trailing layers must be linear_attention)",
        )
    return interval


def _from_hf(d: dict[str, Any]) -> Qwen35Config:
    mt = d.get("model_type")
    if mt is not None and mt not in _MODEL_TYPES:
        raise ConfigError(
            f"model_type={mt!r} is not a Qwen3.5 config; expected one of {sorted(_MODEL_TYPES)}"
        )
    nested = "text_config" in d or mt in ("qwen3_5", "qwen3_5_moe")
    text = as_dict(d.get("text_config") or {}, "text_config") if nested else d
    tmt = text.get("model_type") if nested else mt
    if tmt is not None and tmt not in ("qwen3_5_text", "qwen3_5_moe_text"):
        raise ConfigError(
            f"text_config.model_type={tmt!r} must be 'qwen3_5_text' or 'qwen3_5_moe_text'"
        )
    kinds = {_MODEL_TYPES[m] for m in (mt, tmt) if m is not None}
    check(len(kinds) <= 1, f"model_type={mt!r} and text_config.model_type={tmt!r} disagree")
    n_exp = text.get("num_experts")
    moe = kinds.pop() if kinds else bool(n_exp)
    check(
        moe or not n_exp,
        f"text_config.num_experts={n_exp!r} in a dense config "
        f"(model_type={tmt or mt!r}); expected 0 or absent",
    )
    extra: dict[str, Any] = {}

    # text
    defaults = {f.name: f.default for f in dataclasses.fields(TextConfig)}
    defaults.update(_HF_DEFAULTS[moe])
    modelled = set(defaults) - {"rope_parameters", "full_attention_interval"}
    if not moe:
        modelled -= set(DENSE_ZERO)
    kw = {k: text.get(k, defaults[k]) for k in modelled}
    consumed = (
        modelled | set(_ROPE_KEYS) | set(_SKIP) | set(_MOE_KEYS) | {"full_attention_interval"}
    )
    if not nested:
        consumed |= set(TOKEN_IDS)
    interval = _read_layer_types(text, kw["num_hidden_layers"])
    kw["full_attention_interval"] = interval or text.get("full_attention_interval", 4)
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    rope = as_dict(rope, "text_config.rope_parameters")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_parameters"] = RopeParameters(
        rope_type="default" if rope_type == "mrope" else rope_type,
        rope_theta=rope.get("rope_theta", text.get("rope_theta", _HF_ROPE_THETA)),
        partial_rotary_factor=rope.get(
            "partial_rotary_factor", text.get("partial_rotary_factor", 0.25)
        ),
        mrope_section=rope.get("mrope_section", RopeParameters.mrope_section),
        mrope_interleaved=rope.get("mrope_interleaved", True),
    )
    rope_fields = {f.name for f in dataclasses.fields(RopeParameters)} | {"type"}
    extra.update(
        {f"text_config.rope_parameters.{k}": v for k, v in rope.items() if k not in rope_fields}
    )
    eos = kw["eos_token_id"]
    if isinstance(eos, list) and len(eos) == 1:
        kw["eos_token_id"] = eos[0]
    if nested and "tie_word_embeddings" in d:
        kw["tie_word_embeddings"] = d["tie_word_embeddings"]
    extra.update(
        {
            f"text_config.{k}": v
            for k, v in text.items()
            if k not in consumed and not k.startswith("_")
        }
    )

    # vision and top level
    top: dict[str, Any] = {k: d.get(k, TOP_DEFAULTS[k]) for k in TOKEN_IDS}
    vision = None
    if nested:
        vd = d.get("vision_config")
        vd = {} if vd is None else as_dict(vd, "vision_config")
        vfields = {f.name for f in dataclasses.fields(VisionConfig)}
        vision = VisionConfig(**{k: v for k, v in vd.items() if k in vfields})
        extra.update(
            {
                f"vision_config.{k}": v
                for k, v in vd.items()
                if k not in vfields and k != "model_type" and not k.startswith("_")
            }
        )
        top_consumed = (
            set(_SKIP) | set(TOKEN_IDS) | {"text_config", "vision_config", "tie_word_embeddings"}
        )
        extra.update(
            {k: v for k, v in d.items() if k not in top_consumed and not k.startswith("_")}
        )
    ex = tuple((k, json.dumps(v, sort_keys=True)) for k, v in extra.items())
    return Qwen35Config(text_config=TextConfig(**kw), vision_config=vision, extra=ex, **top)
