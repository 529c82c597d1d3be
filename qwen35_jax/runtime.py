"""Runtime settings: how the model runs, separate from what it is (`Qwen35Config`).

`Qwen35Config` holds the architecture (the Hugging Face fields); `Runtime` holds the choices that
change speed and memory but not the function computed (up to rounding and, with a capacity
factor, dropped expert rows). Every public model function takes ``runtime=`` (None = defaults)
and every module has a ``runtime`` field, so replacing the architecture (e.g. from a checkpoint's
config.json) never touches them.

    compute_dtype, param_dtype      "float32" | "bfloat16": activations / stored parameters
    remat_policy                    "none" | "full" | "dots" | "dots_no_batch" (per layer)
    gdn_chunk_size                  chunk length C of the Gated DeltaNet kernel
    moe_dispatch                    "auto" | "local" | "all_to_all" (`layers/moe_dispatch.py`)
    moe_capacity_factor             0 = dropless; else static per-device expert buffers
    attention_blocked_min_length    rows at least this long use the blocked attention kernel
    attention_block_q, _block_k     its query / key block sizes

Frozen and hashable: usable as a `jax.jit` static argument. Bad values raise `ConfigError`
naming the field (``runtime.remat_policy='x' must be one of ...``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from qwen35_jax.config import ConfigError

DTYPE_CHOICES = ("float32", "bfloat16")
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCH_CHOICES = ("auto", "local", "all_to_all")

_CHOICES = {
    "compute_dtype": DTYPE_CHOICES,
    "param_dtype": DTYPE_CHOICES,
    "remat_policy": REMAT_CHOICES,
    "moe_dispatch": MOE_DISPATCH_CHOICES,
}
_POSITIVE_INTS = (
    "gdn_chunk_size",
    "attention_blocked_min_length",
    "attention_block_q",
    "attention_block_k",
)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs (dtypes, remat, kernel sizes, MoE dispatch); see the module docstring."""

    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    gdn_chunk_size: int = 64
    moe_dispatch: str = "auto"
    moe_capacity_factor: float = 0.0
    attention_blocked_min_length: int = 1024
    attention_block_q: int = 512
    attention_block_k: int = 256

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"runtime.{name}={value!r} must be one of {choices}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool)
            if isinstance(value, float) and value.is_integer():
                value, ok = int(value), True
                object.__setattr__(self, name, value)
            if not ok or value < 1:
                raise ConfigError(f"runtime.{name}={value!r} must be an int >= 1")
        cf = self.moe_capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf):
            raise ConfigError(f"runtime.moe_capacity_factor={cf!r} must be a finite number")
        if cf < 0:
            raise ConfigError(f"runtime.moe_capacity_factor={cf!r} must be >= 0 (0 = dropless)")
        object.__setattr__(self, "moe_capacity_factor", float(cf))

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype as a numpy dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def weights_dtype(self) -> jnp.dtype:
        """The parameter dtype as a numpy dtype."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw: Any) -> Runtime:
        """``dataclasses.replace`` with validation (unknown names raise ConfigError)."""
        return Runtime.from_dict({**self.to_dict(), **kw})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Runtime:
        """Builds from field names (missing keys take defaults; unknown keys refused)."""
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in d if k not in valid)
        if bad:
            raise ConfigError(f"unknown key 'runtime.{bad[0]}'; valid keys: {sorted(valid)}")
        return cls(**d)


def resolve(runtime: Runtime | None) -> Runtime:
    """``runtime``, or the defaults when None."""
    return Runtime() if runtime is None else runtime
