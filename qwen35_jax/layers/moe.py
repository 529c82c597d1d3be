"""Sparse mixture of experts with a gated shared expert (the MoE models' feed-forward).

    p_AE   = softmax(x @ gate)                      router, float32
    w_Ak, e_Ak = top_k(p), w /= sum_k w             top-k, renormalised to sum to 1
    y_A    = sum_k w_Ak * expert_{e_Ak}(x_A)        dropless: every token reaches its k experts
           + sigmoid(x @ shared_expert_gate) * shared_expert(x)
    expert_e(x) = (silu(x @ Wg_e) * (x @ Wu_e)) @ Wd_e

Dispatch: the A*k (token, expert) rows are sorted by expert, each row gathers its token, the
three expert matmuls run as grouped matmuls (`mlp.sorted_swiglu`, `jax.lax.ragged_dot`), and
the weighted rows are scatter-added to their tokens.
Under a mesh of several devices (`jax.set_mesh`) each device instead runs its own tokens
(`moe_dispatch.py`, chosen by `runtime.moe_dispatch`), and with an `expert` axis the tokens
travel to the devices that own their experts by all-to-all (dropless by default; an optional
capacity factor drops and counts overflowing rows).

Routing replay (RL, `train/rl/replay.py`): `MoE(..., record_routing=True)` also returns the
router's own top-k ids e_Ak in `RouterStats.experts` [B, T, k] int32 (in top-k order), and a
forced `routing_BTk` replaces the top-k: the layer then runs those experts with
    w_Ak = p_A[e_Ak] / sum_k p_A[e_Ak]        the current router's probabilities at the given ids
which is Hugging Face's routing (`Qwen3_5MoeTopKRouter`: softmax over all experts in float32,
top-k, always renormalised; Qwen3.5 has no `norm_topk_prob` switch) with the top-k choice
frozen: when the given ids are the router's own top-k, w is bit-identical to normal routing,
and the router still receives gradients through w. With a forced routing, `experts` holds
the router's own top-k (what it would have chosen), so a caller can count changed decisions;
the load statistics below count the experts that ran. The expert-parallel dispatch takes
whichever ids it is given.

Load-balancing statistics (`RouterStats`; Switch-style, as Hugging Face's
`load_balancing_loss_func`): per layer the count of top-k assignments per expert and the sum
of router probabilities per expert over non-padding tokens; the model pools them over layers
and forms
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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax import sharding
from qwen35_jax.config import TextConfig
from qwen35_jax.layers import moe_dispatch
from qwen35_jax.layers.mlp import MLP, expert_order, sorted_swiglu
from qwen35_jax.layers.weights import RuntimeDtypes, weight
from qwen35_jax.runtime import Runtime


class RouterStats(NamedTuple):
    """One MoE layer's router statistics (leading layer axes added by the scans)."""

    expert_counts: jax.Array  # [E] top-k assignments per expert over valid tokens
    router_prob_sum: jax.Array  # [E] sum of router probabilities over valid tokens
    num_tokens: jax.Array  # [] valid tokens
    dropped_tokens: jax.Array  # [] routed (token, expert) rows dropped by the capacity
    # [B, T, k] int32: the router's own top-k ids (only with record_routing; else None)
    experts: jax.Array | None = None


def route(
    x_AD: jax.Array, router_DE: jax.Array, k: int, experts_Ak: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Router probabilities [A, E] and the renormalised top-k weights and experts [A, k].

    experts_Ak (routing replay): use these ids instead of the top-k; their weights are the
    current probabilities at them, renormalised (module docstring)."""
    logits_AE = jnp.dot(x_AD.astype(jnp.float32), router_DE.astype(jnp.float32))
    probs_AE = jax.nn.softmax(logits_AE, axis=-1)
    if experts_Ak is None:
        weights_Ak, experts_Ak = jax.lax.top_k(probs_AE, k)
    else:
        weights_Ak = jnp.take_along_axis(probs_AE, experts_Ak, axis=-1)
    weights_Ak = weights_Ak / jnp.sum(weights_Ak, axis=-1, keepdims=True)
    return probs_AE, weights_Ak, experts_Ak


def grouped_experts(
    x_AD: jax.Array,
    weights_Ak: jax.Array,
    experts_Ak: jax.Array,
    wg_EDI: jax.Array,
    wu_EDI: jax.Array,
    wd_EID: jax.Array,
) -> jax.Array:
    """sum_k w * expert(x) for every token, dropless: the A*k routed rows sorted by expert,
    through `sorted_swiglu`, weighted and scatter-added to their tokens.

    The order of operations is the float32 rounding of the embedded default run's reference
    (gather each sorted row's token; weight in sorted order; scatter-add, whose transpose is the
    gather): going through `grouped_swiglu` (unsort, then sum over k) computes the same sums
    with other roundings (<= 2e-9 per layer, which 600 training steps amplify).
    """
    n, k = experts_Ak.shape
    flat_experts_M = experts_Ak.reshape(n * k)
    order_M, sizes_E = expert_order(flat_experts_M, wg_EDI.shape[0])
    token_M = order_M // k  # sorted row m holds token m // k's slot m % k
    y_MD = sorted_swiglu(x_AD[token_M], sizes_E, wg_EDI, wu_EDI, wd_EID)
    y_MD = y_MD * weights_Ak.reshape(n * k)[order_M][:, None].astype(y_MD.dtype)
    return jnp.zeros_like(x_AD).at[token_M].add(y_MD)


class MoE(RuntimeDtypes, nn.Module):
    """Router, routed experts and gated shared expert. Dispatch: `runtime.moe_dispatch` and
    `runtime.moe_capacity_factor` (see `moe_dispatch`). record_routing: fill
    `RouterStats.experts`; routing_BTk: forced expert ids (routing replay)."""

    config: TextConfig
    runtime: Runtime = Runtime()
    record_routing: bool = False

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, valid_BT: jax.Array, routing_BTk: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        c = self.config
        d, e = c.hidden_size, c.num_experts
        b, t, _ = x_BTD.shape

        router_DE = weight(self, "gate", (d, e), ("embed", "router"), cast=False)
        experts = _Experts(c, self.runtime, name="experts")
        shared_gate_D = weight(self, "shared_expert_gate", (d,), ("embed",))

        x_BTD = x_BTD.astype(self.dtype)
        x_AD = x_BTD.reshape(b * t, d)
        k = c.num_experts_per_tok
        forced_Ak = None if routing_BTk is None else routing_BTk.reshape(b * t, k)
        probs_AE, weights_Ak, experts_Ak = route(x_AD, router_DE, k, forced_Ak)
        routed_BTD, dropped = experts(
            x_BTD, weights_Ak.reshape(b, t, k), experts_Ak.reshape(b, t, k), valid_BT
        )

        shared_AD = MLP(
            d, c.shared_expert_intermediate_size, self.dtype, self.param_dtype, name="shared_expert"
        )(x_AD)
        shared_AD = shared_AD * jax.nn.sigmoid(x_AD @ shared_gate_D)[:, None]
        y_BTD = routed_BTD + shared_AD.reshape(b, t, d)

        valid_A = valid_BT.reshape(b * t).astype(jnp.float32)
        # counted where the tokens live ([B, T] split as the activations): left to sharding
        # propagation, the TPU compiler all-gathered the [tokens, k, E] one-hot over every
        # batch shard (20 GiB per layer at the 397b recipe's 4M tokens per micro-batch)
        onehot_BTkE = jax.nn.one_hot(experts_Ak.reshape(b, t, k), e, dtype=jnp.float32)
        onehot_BTkE = sharding.constrain(onehot_BTkE, ("batch", "length", None, None))
        counts_E = jnp.sum(onehot_BTkE * valid_BT.astype(jnp.float32)[..., None, None], (0, 1, 2))
        stats = RouterStats(
            expert_counts=counts_E,
            router_prob_sum=jnp.sum(probs_AE * valid_A[:, None], axis=0),
            num_tokens=jnp.sum(valid_A),
            dropped_tokens=dropped,
        )
        if self.record_routing:
            own_Ak = experts_Ak if forced_Ak is None else jax.lax.top_k(probs_AE, k)[1]
            stats = stats._replace(experts=own_Ak.astype(jnp.int32).reshape(b, t, k))
        return y_BTD, stats


class _Experts(RuntimeDtypes, nn.Module):
    """The routed experts' stacked weights and the grouped computation (local or all-to-all)."""

    config: TextConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x_BTD, weights_BTk, experts_BTk, valid_BT):
        c = self.config
        d, e, i = c.hidden_size, c.num_experts, c.moe_intermediate_size
        wg = weight(self, "gate_proj", (e, d, i), ("experts", "embed", "mlp"))
        wu = weight(self, "up_proj", (e, d, i), ("experts", "embed", "mlp"))
        wd = weight(self, "down_proj", (e, i, d), ("experts", "mlp", "embed"))
        mode, cf = self.runtime.moe_dispatch, self.runtime.moe_capacity_factor
        b, t, k = experts_BTk.shape
        layout = None
        if not self.is_initializing():
            layout = moe_dispatch.resolve_mode(mode, b, t, wg.shape, wd.shape)
        if layout is None:
            y_AD = grouped_experts(
                x_BTD.reshape(b * t, d),
                weights_BTk.reshape(b * t, k),
                experts_BTk.reshape(b * t, k),
                wg,
                wu,
                wd,
            )
            return y_AD.reshape(b, t, d), jnp.zeros((), jnp.float32)
        return moe_dispatch.expert_parallel(
            x_BTD, weights_BTk, experts_BTk, valid_BT, wg, wu, wd, layout, cf
        )
