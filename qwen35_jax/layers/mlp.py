"""SwiGLU feed-forward: y = (silu(x @ gate_proj) * (x @ up_proj)) @ down_proj.

Parameter names (ours -> Hugging Face `mlp.*`, kernels transposed):
    gate_proj [D, I] <- gate_proj.weight [I, D]
    up_proj   [D, I] <- up_proj.weight   [I, D]
    down_proj [I, D] <- down_proj.weight [D, I]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

KERNEL_INIT = nn.initializers.normal(0.02)


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d, i = self.hidden_size, self.intermediate_size

        def kernel(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
            w = self.param(
                name, nn.with_logical_partitioning(KERNEL_INIT, axes), shape, self.param_dtype
            )
            return w.astype(self.dtype)

        x_BTD = x_BTD.astype(self.dtype)
        gate_BTI = x_BTD @ kernel("gate_proj", (d, i), ("embed", "mlp"))
        up_BTI = x_BTD @ kernel("up_proj", (d, i), ("embed", "mlp"))
        return (jax.nn.silu(gate_BTI) * up_BTI) @ kernel("down_proj", (i, d), ("mlp", "embed"))
