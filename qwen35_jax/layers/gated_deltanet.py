"""Gated DeltaNet: linear attention with a gated delta-rule state (the linear-attention layers).

    q_BTJK, k_BTJK, v_BTHV = x @ in_proj_{q,k,v}          J = Nk key heads, H = Nv value heads
    q, k, v = silu(causal_depthwise_conv(q, k, v))         kernel W=4, no bias; the window never
                                                           reaches across a document start
    z_BTHV = x @ in_proj_z;  b_BTH = x @ in_proj_b;  a_BTH = x @ in_proj_a
    beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)          float32
    q, k = l2norm(q), l2norm(k)   (x * rsqrt(sum x^2 + 1e-6)); repeated to H heads, each key
                                  head serving H/J consecutive value heads
    S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T;  o_t = S_t^T q_t / sqrt(K)
    y = out_proj(gated_rmsnorm(o, z))

The recurrence runs in `qwen35_jax.ops.gated_delta_rule` (chunkwise parallel, state reset at
every document start given by `segment_ids`; 0 marks padding and leaves the state untouched).

Parameter names (ours -> Hugging Face `linear_attn.*`); HF fuses q|k|v into one projection and
one conv, channel order [q (Nk*K) | k (Nk*K) | v (Nv*V)]; we keep them per head:
    in_proj_q [D, J, K], in_proj_k [D, J, K], in_proj_v [D, H, V]  <- in_proj_qkv.weight [C, D]
    conv_q [W, J, K], conv_k [W, J, K], conv_v [W, H, V]           <- conv1d.weight [C, 1, W]
    in_proj_z [D, H, V] <- in_proj_z.weight;  in_proj_b [D, H] <- in_proj_b.weight
    in_proj_a [D, H] <- in_proj_a.weight;     A_log [H], dt_bias [H] (same names)
    norm/scale [V] <- norm.weight;            out_proj [H, V, D] <- out_proj.weight [D, H*V]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.config import TextConfig
from qwen35_jax.layers.norms import GatedRMSNorm
from qwen35_jax.ops import gated_delta_rule

KERNEL_INIT = nn.initializers.normal(0.02)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x_BTC: jax.Array, w_WC: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    """Depthwise causal conv: y_t = sum_j w_j x_{t-W+1+j}, only over taps in t's document.

    Channels may carry several trailing axes (x [B, T, ...], w [W, ...]).
    """
    width, t = w_WC.shape[0], x_BTC.shape[1]
    y = jnp.zeros(x_BTC.shape, jnp.float32)
    trailing = (1,) * (x_BTC.ndim - 2)
    for j in range(width):
        shift = width - 1 - j
        if shift >= t:
            continue
        pad = [(0, 0), (shift, 0)] + [(0, 0)] * (x_BTC.ndim - 2)
        x_shift = jnp.pad(x_BTC, pad)[:, :t]
        seg_shift = jnp.pad(segment_ids_BT, [(0, 0), (shift, 0)], constant_values=-1)[:, :t]
        same_BT = (seg_shift == segment_ids_BT).reshape(*segment_ids_BT.shape, *trailing)
        y = y + jnp.where(same_BT, x_shift * w_WC[j][None, None], 0).astype(jnp.float32)
    return y.astype(x_BTC.dtype)


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 0.01, 16.0))


def _conv_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class GatedDeltaNet(nn.Module):
    config: TextConfig
    chunk_size: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _param(self, name, shape, axes, init=KERNEL_INIT, cast=True):
        w = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        return w.astype(self.dtype) if cast else w

    @nn.compact
    def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
        c = self.config
        d, w = c.hidden_size, c.linear_conv_kernel_dim
        nk, nv = c.linear_num_key_heads, c.linear_num_value_heads
        kd, vd = c.linear_key_head_dim, c.linear_value_head_dim
        p = self._param
        wq = p("in_proj_q", (d, nk, kd), ("embed", "heads", "head_dim"))
        wk = p("in_proj_k", (d, nk, kd), ("embed", "heads", "head_dim"))
        wv = p("in_proj_v", (d, nv, vd), ("embed", "heads", "head_dim"))
        wz = p("in_proj_z", (d, nv, vd), ("embed", "heads", "head_dim"))
        wb = p("in_proj_b", (d, nv), ("embed", "heads"))
        wa = p("in_proj_a", (d, nv), ("embed", "heads"))
        cq = p("conv_q", (w, nk, kd), ("conv", "heads", "head_dim"), _conv_init)
        ck = p("conv_k", (w, nk, kd), ("conv", "heads", "head_dim"), _conv_init)
        cv = p("conv_v", (w, nv, vd), ("conv", "heads", "head_dim"), _conv_init)
        a_log = p("A_log", (nv,), ("heads",), _a_log_init, cast=False)
        dt_bias = p("dt_bias", (nv,), ("heads",), nn.initializers.ones_init(), cast=False)
        wo = p("out_proj", (nv, vd, d), ("heads", "head_dim", "embed"))

        # padding positions are zeroed first, as the reference does
        x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0).astype(self.dtype)
        q_BTJK = jax.nn.silu(
            causal_conv(jnp.einsum("btd,djk->btjk", x_BTD, wq), cq, segment_ids_BT)
        )
        k_BTJK = jax.nn.silu(
            causal_conv(jnp.einsum("btd,djk->btjk", x_BTD, wk), ck, segment_ids_BT)
        )
        v_BTHV = jax.nn.silu(
            causal_conv(jnp.einsum("btd,dhv->bthv", x_BTD, wv), cv, segment_ids_BT)
        )
        z_BTHV = jnp.einsum("btd,dhv->bthv", x_BTD, wz)
        b_BTH = jnp.einsum("btd,dh->bth", x_BTD, wb)
        a_BTH = jnp.einsum("btd,dh->bth", x_BTD, wa)

        beta_BTH = jax.nn.sigmoid(b_BTH.astype(jnp.float32))
        g_BTH = -jnp.exp(a_log.astype(jnp.float32))[None, None, :] * jax.nn.softplus(
            a_BTH.astype(jnp.float32) + dt_bias.astype(jnp.float32)[None, None, :]
        )
        rep = nv // nk
        q_BTHK = jnp.repeat(l2_normalize(q_BTJK), rep, axis=2).astype(self.dtype)
        k_BTHK = jnp.repeat(l2_normalize(k_BTJK), rep, axis=2).astype(self.dtype)

        o_BTHV = gated_delta_rule(
            q_BTHK,
            k_BTHK,
            v_BTHV,
            g_BTH,
            beta_BTH,
            segment_ids=segment_ids_BT,
            chunk_size=self.chunk_size,
        )
        o_BTHV = GatedRMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(o_BTHV, z_BTHV)
        return jnp.einsum("bthv,hvd->btd", o_BTHV.astype(self.dtype), wo)
