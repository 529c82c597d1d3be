"""SwiGLU feed-forward, dense and grouped (one expert per row).

    swiglu(x) = (silu(x @ gate_proj) * (x @ up_proj)) @ down_proj

`MLP` is the dense form (the dense models' FFN and the MoE shared expert). `sorted_swiglu` is
the one expert computation of both MoE paths: rows already sorted by expert, the three matmuls
as grouped matmuls (`jax.lax.ragged_dot`). `grouped_swiglu` sorts arbitrary rows for it and puts
them back (`moe_dispatch.py`, expert-parallel); `moe.grouped_experts` (single device) gathers
its tokens straight into sorted order and combines them from there.

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


def sorted_swiglu(
    xs_RD: jax.Array, sizes_E: jax.Array, wg_EDI: jax.Array, wu_EDI: jax.Array, wd_EID: jax.Array
) -> jax.Array:
    """swiglu of rows sorted by expert: the first sizes_E[0] rows with expert 0's weights, the
    next sizes_E[1] with expert 1's, ...; rows past sum(sizes_E) give 0. [R, D] in the same order.
    """
    gate_RI = jax.lax.ragged_dot(xs_RD, wg_EDI, sizes_E)
    up_RI = jax.lax.ragged_dot(xs_RD, wu_EDI, sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate_RI) * up_RI, wd_EID, sizes_E)


def expert_order(expert_R: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(order_R, sizes_E): the stable sort of rows by expert id and the rows per expert (ids
    equal to num_experts, empty slots, sort last and are not counted)."""
    order_R = jnp.argsort(expert_R, stable=True)
    sizes_E = jnp.bincount(expert_R, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order_R, sizes_E


def grouped_swiglu(
    x_RD: jax.Array, expert_R: jax.Array, wg_EDI: jax.Array, wu_EDI: jax.Array, wd_EID: jax.Array
) -> jax.Array:
    """swiglu of each row r with expert expert_R[r]'s weights, [R, D] in row order.

    A row whose expert id is E (one past the last) is not computed and gives 0 (an empty slot of
    a dispatch buffer). Rows are sorted by expert (stable) so that each expert's rows are
    contiguous for `sorted_swiglu`, then put back in their order.
    """
    order_R, sizes_E = expert_order(expert_R, wg_EDI.shape[0])
    ys_RD = sorted_swiglu(x_RD[order_R], sizes_E, wg_EDI, wu_EDI, wd_EID)
    return jnp.zeros_like(ys_RD).at[order_R].set(ys_RD, unique_indices=True)
