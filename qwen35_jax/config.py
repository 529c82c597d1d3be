"""Model configuration for the Qwen3.5 family: frozen dataclasses, HF config.json in/out.

The presets live in `presets.py`.

Every dataclass validates (and normalises: lists become tuples, integral floats become ints) in
``__post_init__``, so every construction path -- the constructor, ``replace``, ``from_dict``,
``from_hf`` -- yields a checked, hashable config usable as a ``jax.jit`` static argument. Errors
are ``ConfigError`` naming the dotted field, the bad value and what was expected.

The Hugging Face ``config.json`` translation lives in `hf_config.py` (``hf_config.from_hf``,
``hf_config.to_hf``; exported as ``qwen35_jax.config_from_hf`` / ``config_to_hf``), which
imports this module and not the other way round.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names the dotted field, its value and what was
    expected."""


_SCALARS = {
    bool: ((bool,), "a bool"),
    int: ((numbers.Integral,), "an int"),
    float: ((numbers.Real,), "a finite number"),
    str: ((str,), "a str"),
}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp`` and returns it in canonical form."""
    if tp in _SCALARS:
        kinds, what = _SCALARS[tp]
        ok = isinstance(value, kinds) and (tp is bool or not isinstance(value, bool))
        if tp is int and isinstance(value, float):
            ok = value.is_integer()
        if tp is float and ok:
            ok = math.isfinite(value)
        if not ok:
            raise ConfigError(f"{path}={value!r} must be {what}")
        return tp(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):  # only `X | None` is used
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list or tuple")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{path}={value!r} must have {len(args)} entries")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in pairs)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path} must be a {tp.__name__}, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {path}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _normalise(obj: Any, prefix: str) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(prefix + f.name, getattr(obj, f.name), hints[f.name])
        object.__setattr__(obj, f.name, value)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(obj: Any, prefix: str, names: typing.Iterable[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value > 0, f"{prefix}{name}={value!r} must be > 0")


def _nonneg(obj: Any, prefix: str, names: typing.Iterable[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value is None or value >= 0, f"{prefix}{name}={value!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """Text rotary embedding (HF ``text_config.rope_parameters``)."""

    rope_type: str = "default"
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    mrope_interleaved: bool = True  # HF always interleaves; kept for round trips

    def __post_init__(self) -> None:
        p = "text_config.rope_parameters."
        _normalise(self, p)
        check(
            self.rope_type == "default",
            f"{p}rope_type={self.rope_type!r} is not supported; expected 'default'",
        )
        _positive(self, p, ["rope_theta"])
        prf = self.partial_rotary_factor
        check(0.0 < prf <= 1.0, f"{p}partial_rotary_factor={prf!r} must be in (0, 1]")
        for i, s in enumerate(self.mrope_section):
            check(s >= 0, f"{p}mrope_section[{i}]={s} must be >= 0")


DENSE_ZERO = ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language model (HF ``text_config``; field names are Hugging Face's)."""

    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288  # dense FFN width (ignored by MoE layers)
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    full_attention_interval: int = 4  # HF stores layer_types; we derive them from this
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    rope_parameters: RopeParameters = RopeParameters()
    num_experts: int = 0  # 0 = dense model
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    mtp_num_hidden_layers: int = 0
    mtp_use_dedicated_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        p = "text_config."
        _normalise(self, p)
        _positive(
            self,
            p,
            [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "rms_norm_eps",
                "full_attention_interval",
                "linear_conv_kernel_dim",
                "linear_key_head_dim",
                "linear_value_head_dim",
                "linear_num_key_heads",
                "linear_num_value_heads",
            ],
        )
        for a, b in [
            ("num_attention_heads", "num_key_value_heads"),
            ("linear_num_value_heads", "linear_num_key_heads"),
        ]:
            va, vb = getattr(self, a), getattr(self, b)
            check(va % vb == 0, f"{p}{a}={va} must be divisible by {p}{b}={vb}")
        check(
            self.full_attention_interval <= self.num_hidden_layers,
            f"{p}full_attention_interval={self.full_attention_interval} must be <= "
            f"{p}num_hidden_layers={self.num_hidden_layers}",
        )
        check(self.hidden_act == "silu", f"{p}hidden_act={self.hidden_act!r} must be 'silu'")
        prf = self.rope_parameters.partial_rotary_factor
        rot = self.head_dim * prf
        check(
            rot == int(rot) and int(rot) % 2 == 0 and rot > 0,
            f"{p}head_dim={self.head_dim} * {p}rope_parameters.partial_rotary_factor={prf} "
            f"= {rot} must be a positive even integer (the rotary dim)",
        )
        _nonneg(
            self,
            p,
            [
                "num_experts",
                "router_aux_loss_coef",
                "mtp_num_hidden_layers",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            ],
        )
        if self.num_experts > 0:
            k = self.num_experts_per_tok
            check(
                1 <= k <= self.num_experts,
                f"{p}num_experts_per_tok={k} must be in [1, {p}num_experts={self.num_experts}]",
            )
            _positive(self, p, ["moe_intermediate_size", "shared_expert_intermediate_size"])
        else:
            for name in DENSE_ZERO:
                check(
                    getattr(self, name) == 0,
                    f"{p}{name}={getattr(self, name)} must be 0 "
                    f"for a dense model ({p}num_experts=0)",
                )
        check(
            not self.mtp_use_dedicated_embeddings,
            f"{p}mtp_use_dedicated_embeddings=True is not supported (expected False: the MTP "
            "head shares the main model's embedding)",
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        n = self.full_attention_interval
        return tuple(
            "linear_attention" if (i + 1) % n else "full_attention"
            for i in range(self.num_hidden_layers)
        )

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // self.full_attention_interval

    @property
    def num_tail_layers(self) -> int:
        """Trailing layers after the last full block; all linear attention."""
        return self.num_hidden_layers % self.full_attention_interval


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower and merger (HF ``vision_config``)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        p = "vision_config."
        _normalise(self, p)
        _positive(
            self,
            p,
            [
                "depth",
                "hidden_size",
                "intermediate_size",
                "num_heads",
                "in_channels",
                "patch_size",
                "spatial_merge_size",
                "temporal_patch_size",
                "out_hidden_size",
                "num_position_embeddings",
            ],
        )
        check(
            self.hidden_size % self.num_heads == 0,
            f"{p}hidden_size={self.hidden_size} must be divisible by {p}num_heads={self.num_heads}",
        )
        for i, d in enumerate(self.deepstack_visual_indexes):
            check(
                0 <= d < self.depth,
                f"{p}deepstack_visual_indexes[{i}]={d} must be in [0, {p}depth={self.depth})",
            )


TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class Qwen35Config:
    """A whole model (the architecture only): text config, optional vision config, token ids.

    How it runs (dtypes, remat, kernel sizes, MoE dispatch) is `runtime.Runtime`."""

    text_config: TextConfig = TextConfig()
    vision_config: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    extra: tuple[tuple[str, str], ...] = ()  # unmodelled HF keys: (dotted key, JSON string)

    def __post_init__(self) -> None:
        _normalise(self, "")
        _nonneg(self, "", TOKEN_IDS)
        v, d = self.vision_config, self.text_config.hidden_size
        check(
            v is None or v.out_hidden_size == d,
            f"vision_config.out_hidden_size="
            f"{v and v.out_hidden_size} must equal text_config.hidden_size={d}",
        )
        extra = tuple(sorted(self.extra))
        for i, (key, value) in enumerate(extra):
            check(i == 0 or key != extra[i - 1][0], f"extra has the key {key!r} twice")
            try:
                json.loads(value)
            except ValueError:
                raise ConfigError(f"extra[{key!r}]={value!r} must be a JSON string") from None
        object.__setattr__(self, "extra", extra)

    @property
    def text(self) -> TextConfig:
        return self.text_config

    @property
    def is_moe(self) -> bool:
        return self.text_config.is_moe

    def replace(self, **kw: Any) -> Qwen35Config:
        """``dataclasses.replace`` with validation (unknown names raise ConfigError)."""
        _unknown(kw, {f.name for f in dataclasses.fields(self)}, "")
        return dataclasses.replace(self, **kw)

    # ---- our own nested dict form ----
    def to_dict(self) -> dict[str, Any]:
        d = plain(dataclasses.asdict(self))
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen35Config:
        """Builds from our field names (nested; missing keys take defaults; strict)."""
        d = dict(as_dict(d, "config"))
        if isinstance(d.get("extra"), dict):
            d["extra"] = tuple(d["extra"].items())
        return _build(cls, d, "")


TOP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Qwen35Config)}


def plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def as_dict(x: Any, path: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ConfigError(f"{path} must be a dict, got {type(x).__name__} {x!r}")
    return x


def _build(cls: type, d: Any, prefix: str) -> Any:
    """``cls(**d)`` for our nested dict form; nested dataclass fields are built recursively."""
    d = dict(as_dict(d, prefix[:-1] or "config"))
    _unknown(d, {f.name for f in dataclasses.fields(cls)}, prefix)
    for name, value in d.items():
        sub = [
            t
            for t in typing.get_args(_hints(cls)[name]) or [_hints(cls)[name]]
            if dataclasses.is_dataclass(t)
        ]
        if sub and isinstance(value, dict):
            d[name] = _build(sub[0], value, f"{prefix}{name}.")
    return cls(**d)


def _unknown(d: dict[str, Any], valid: set[str], prefix: str) -> None:
    bad = [k for k in d if k not in valid]
    if bad:
        raise ConfigError(f"unknown key {prefix + bad[0]!r}; valid keys: {sorted(valid)}")
