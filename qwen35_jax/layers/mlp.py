"""SwiGLU feed-forward, dense and grouped (one expert per row).

    swiglu(x) = (silu(x @ gate_proj) * (x @ up_proj)) @ down_proj

`MLP` is the dense form (the dense models' FFN and the MoE shared expert). `grouped_swiglu` runs
each row through its own expert's weights, rows sorted by expert and the three matmuls as
grouped matmuls (`jax.lax.ragged_dot`); both MoE paths (`moe.py`, single device, and
`moe_dispatch.py`, expert-parallel) use it.

Parameter names (ours -> Hugging Face `mlp.*`, kernels transposed):
    gate_proj [D, I] <- gate_proj.weight [I, D]
    up_proj   [D, I] <- up_proj.weight   [I, D]
    down_proj [I, D] <- down_proj.weight [D, I]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.layers.weights import weight


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d, i = self.hidden_size, self.intermediate_size
        x_BTD = x_BTD.astype(self.dtype)
        gate_BTI = x_BTD @ weight(self, "gate_proj", (d, i), ("embed", "mlp"))
        up_BTI = x_BTD @ weight(self, "up_proj", (d, i), ("embed", "mlp"))
        return (jax.nn.silu(gate_BTI) * up_BTI) @ weight(
            self, "down_proj", (i, d), ("mlp", "embed")
        )


def grouped_swiglu(
    x_RD: jax.Array, expert_R: jax.Array, wg_EDI: jax.Array, wu_EDI: jax.Array, wd_EID: jax.Array
) -> jax.Array:
    """swiglu of each row r with expert expert_R[r]'s weights, [R, D] in row order.

    A row whose expert id is E (one past the last) is not computed and gives 0 (an empty slot of
    a dispatch buffer). Rows are sorted by expert (stable) so that each expert's rows are
    contiguous for `ragged_dot`, then put back in their order.
    """
    e = wg_EDI.shape[0]
    order_R = jnp.argsort(expert_R, stable=True)
    sizes_E = jnp.bincount(expert_R, length=e + 1)[:e].astype(jnp.int32)
    xs_RD = x_RD[order_R]
    gate_RI = jax.lax.ragged_dot(xs_RD, wg_EDI, sizes_E)
    up_RI = jax.lax.ragged_dot(xs_RD, wu_EDI, sizes_E)
    ys_RD = jax.lax.ragged_dot(jax.nn.silu(gate_RI) * up_RI, wd_EID, sizes_E)
    return jnp.zeros_like(ys_RD).at[order_R].set(ys_RD, unique_indices=True)
