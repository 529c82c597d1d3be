"""Sparse mixture of experts with a gated shared expert (the MoE models' feed-forward).

    p_NE   = softmax(x @ gate)                      router, float32
    w_Nk, e_Nk = top_k(p), w /= sum_k w             top-k, renormalised to sum to 1
    y_N    = sum_k w_Nk * expert_{e_Nk}(x_N)        dropless: every token reaches its k experts
           + sigmoid(x @ shared_expert_gate) * shared_expert(x)
    expert_e(x) = (silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e

Dispatch: the N*k (token, expert) pairs are sorted by expert so each expert's tokens are
contiguous, the three expert matmuls are grouped matmuls (`jax.lax.ragged_dot`) over the sorted
rows, and the weighted results are scattered back to their tokens. Under a mesh of several
devices (`jax.set_mesh`) each device instead runs its own tokens (`moe_dispatch.py`, chosen by
`runtime.moe_dispatch`), and with an `expert` axis the tokens travel to the devices that own
their experts by all-to-all (dropless by default; an optional capacity factor drops and counts
overflowing rows).

Load-balancing statistics (Switch-style, as Hugging Face's `load_balancing_loss_func`): per layer
the count of top-k assignments per expert and the sum of router probabilities per expert over
non-padding tokens; the model pools them over layers and forms
    aux = E * sum_e (counts_e / n) * (probs_e / n),   n = layers * valid tokens.

Parameter names (ours -> Hugging Face `mlp.*`):
    gate [D, E]                    <- gate.weight [E, D]
    experts/gate_proj [E, D, I]    <- experts.{e}.gate_proj.weight [I, D]  (or fused gate_up_proj)
    experts/up_proj   [E, D, I]    <- experts.{e}.up_proj.weight   [I, D]
    experts/down_proj [E, I, D]    <- experts.{e}.down_proj.weight [D, I]
    shared_expert/{gate,up,down}_proj  <- shared_expert.*.weight (as the dense MLP)
    shared_expert_gate [D]         <- shared_expert_gate.weight [1, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.config import TextConfig
from qwen35_jax.layers import moe_dispatch
from qwen35_jax.layers.mlp import MLP
from qwen35_jax.layers.weights import RuntimeDtypes
from qwen35_jax.runtime import Runtime

KERNEL_INIT = nn.initializers.normal(0.02)


def route(x_ND: jax.Array, router_DE: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """Router probabilities [N, E] and the renormalised top-k weights and experts [N, k]."""
    logits_NE = jnp.dot(x_ND.astype(jnp.float32), router_DE.astype(jnp.float32))
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    weights_Nk, experts_Nk = jax.lax.top_k(probs_NE, k)
    weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
    return probs_NE, weights_Nk, experts_Nk


def grouped_experts(
    x_ND: jax.Array,
    weights_Nk: jax.Array,
    experts_Nk: jax.Array,
    wg_EDI: jax.Array,
    wu_EDI: jax.Array,
    wd_EID: jax.Array,
) -> jax.Array:
    """sum_k w * expert(x) for every token, dropless, via sorted rows and ragged_dot."""
    n, k = experts_Nk.shape
    num_experts = wg_EDI.shape[0]
    flat_experts_M = experts_Nk.reshape(n * k)
    order_M = jnp.argsort(flat_experts_M, stable=True)
    token_M = order_M // k
    group_sizes_E = jnp.bincount(flat_experts_M, length=num_experts).astype(jnp.int32)
    x_MD = x_ND[token_M]
    gate_MI = jax.lax.ragged_dot(x_MD, wg_EDI, group_sizes_E)
    up_MI = jax.lax.ragged_dot(x_MD, wu_EDI, group_sizes_E)
    y_MD = jax.lax.ragged_dot(jax.nn.silu(gate_MI) * up_MI, wd_EID, group_sizes_E)
    y_MD = y_MD * weights_Nk.reshape(n * k)[order_M][:, None].astype(y_MD.dtype)
    return jnp.zeros_like(x_ND).at[token_M].add(y_MD)


class MoE(RuntimeDtypes, nn.Module):
    """Router, routed experts and gated shared expert. Dispatch: `runtime.moe_dispatch` and
    `runtime.moe_capacity_factor` (see `moe_dispatch`)."""

    config: TextConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array) -> tuple[jax.Array, dict]:
        c = self.config
        d, e = c.hidden_size, c.num_experts
        b, t, _ = x_BTD.shape

        def param(name, shape, axes, init=KERNEL_INIT):
            w = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
            return w.astype(self.dtype)

        router_DE = self.param(
            "gate",
            nn.with_logical_partitioning(KERNEL_INIT, ("embed", "router")),
            (d, e),
            self.param_dtype,
        )
        experts = _Experts(c, self.runtime, name="experts")
        shared_gate_D = param("shared_expert_gate", (d,), ("embed",))

        x_BTD = x_BTD.astype(self.dtype)
        x_ND = x_BTD.reshape(b * t, d)
        k = c.num_experts_per_tok
        probs_NE, weights_Nk, experts_Nk = route(x_ND, router_DE, k)
        routed_BTD, dropped = experts(
            x_BTD, weights_Nk.reshape(b, t, k), experts_Nk.reshape(b, t, k), valid_BT
        )

        shared_ND = MLP(
            d, c.shared_expert_intermediate_size, self.dtype, self.param_dtype, name="shared_expert"
        )(x_ND)
        shared_ND = shared_ND * jax.nn.sigmoid(x_ND @ shared_gate_D)[:, None]
        y_BTD = routed_BTD + shared_ND.reshape(b, t, d)

        valid_N = valid_BT.reshape(b * t).astype(jnp.float32)
        counts_E = jnp.sum(
            jax.nn.one_hot(experts_Nk, e, dtype=jnp.float32) * valid_N[:, None, None], axis=(0, 1)
        )
        stats = {
            "expert_counts": counts_E,
            "router_prob_sum": jnp.sum(probs_NE * valid_N[:, None], axis=0),
            "num_tokens": jnp.sum(valid_N),
            "dropped_tokens": dropped,  # routed (token, expert) pairs dropped by capacity
        }
        return y_BTD, stats


class _Experts(RuntimeDtypes, nn.Module):
    """The routed experts' stacked weights and the grouped computation (local or all-to-all)."""

    config: TextConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x_BTD, weights_BTk, experts_BTk, valid_BT):
        c = self.config
        d, e, i = c.hidden_size, c.num_experts, c.moe_intermediate_size

        def param(name, shape, axes):
            w = self.param(
                name, nn.with_logical_partitioning(KERNEL_INIT, axes), shape, self.param_dtype
            )
            return w.astype(self.dtype)

        wg = param("gate_proj", (e, d, i), ("experts", "embed", "mlp"))
        wu = param("up_proj", (e, d, i), ("experts", "embed", "mlp"))
        wd = param("down_proj", (e, i, d), ("experts", "mlp", "embed"))
        mode, cf = self.runtime.moe_dispatch, self.runtime.moe_capacity_factor
        b, t, k = experts_BTk.shape
        layout = None
        if not self.is_initializing():
            layout = moe_dispatch.resolve_mode(mode, b, t, wg.shape, wd.shape)
        if layout is None:
            y_ND = grouped_experts(
                x_BTD.reshape(b * t, d),
                weights_BTk.reshape(b * t, k),
                experts_BTk.reshape(b * t, k),
                wg,
                wu,
                wd,
            )
            return y_ND.reshape(b, t, d), jnp.zeros((), jnp.float32)
        return moe_dispatch.expert_parallel(
            x_BTD, weights_BTk, experts_BTk, valid_BT, wg, wu, wd, layout, cf
        )
