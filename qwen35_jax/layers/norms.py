"""Normalisations.

RMSNorm (zero-centred), used for the layer norms, the final norm, q/k norms and MTP norms:
    y = x * rsqrt(mean(x^2) + eps) * (1 + w)        computed in float32, cast back; w starts at 0
    ours `scale`  <->  HF `*.weight` (e.g. `input_layernorm.weight`, `q_norm.weight`)

Gated RMSNorm, the output norm of Gated DeltaNet (per head, over the value dim V):
    y = (w * (x * rsqrt(mean(x^2) + eps))) * silu(z)          w starts at 1
    ours `linear_attn/norm/scale`  <->  HF `linear_attn.norm.weight`
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.layers.weights import ONES, ZEROS, weight


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _lift(w_D: jax.Array, ndim: int) -> jax.Array:
    return w_D.reshape((1,) * (ndim - 1) + w_D.shape)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm over the last axis."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (x.shape[-1],), ("norm",), ZEROS, cast=False)
        y = rms_normalize(x, self.eps) * _lift(1.0 + scale.astype(jnp.float32), x.ndim)
        return y.astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a weight (initialised at 1) followed by a SiLU gate: norm(x) * w * silu(z)."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (x.shape[-1],), ("norm",), ONES, cast=False)
        y = _lift(scale.astype(x.dtype), x.ndim) * rms_normalize(x, self.eps).astype(x.dtype)
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return y.astype(x.dtype)
