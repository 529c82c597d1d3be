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

Sequence parallelism: under a mesh (`jax.set_mesh`) whose sequence axis (the sharding table's
axis for `length`) has Z > 1 devices, the conv and the recurrence run per slice of T/Z tokens in
`ops.sequence_parallel_gated_delta_rule` (one `shard_map`): each device takes the last W-1 conv
inputs of the previous slice as a halo and combines the slices' affine state maps. Without such
an axis the single-device code below runs. A T that does not split into Z slices of >= W-1
tokens (generation, evaluation) also runs it, with a one-time warning; the trainer refuses such
a train.seq_len before any compute.

Decoding (`GDNCache`): `layer(x, segment_ids, return_cache=True)` is a prefill that also returns
the cache of each row's last document: the last W-1 conv inputs (pre-conv projections; zeros
before the document start) and the float32 state [B, H, K, V]. `layer(x, None, cache)` continues
every row's document by T new tokens (T = 1: `gated_delta_rule_step`) and returns the new cache:

    conv window_t = [window_{t-1}[1:], x_t];  y_t = silu(sum_j w_j window_t[j])

Parameter names (ours -> Hugging Face `linear_attn.*`); HF fuses q|k|v into one projection and
one conv, channel order [q (Nk*K) | k (Nk*K) | v (Nv*V)]; we keep them per head:
    in_proj_q [D, J, K], in_proj_k [D, J, K], in_proj_v [D, H, V]  <- in_proj_qkv.weight [C, D]
    conv_q [W, J, K], conv_k [W, J, K], conv_v [W, H, V]           <- conv1d.weight [C, 1, W]
    in_proj_z [D, H, V] <- in_proj_z.weight;  in_proj_b [D, H] <- in_proj_b.weight
    in_proj_a [D, H] <- in_proj_a.weight;     A_log [H], dt_bias [H] (same names)
    norm/scale [V] <- norm.weight;            out_proj [H, V, D] <- out_proj.weight [D, H*V]
in_proj_b and in_proj_a ([D, H], 16-64 heads) are not split over `fsdp` (D's `embed` name):
split, the TPU compiler turned `btd,dh->bth` into rings of collective-permutes of partial
outputs instead of gathering the few weights (launch.compile on the tiny step: 40 permutes,
none without the split).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.config import TextConfig
from qwen35_jax.layers.norms import GatedRMSNorm
from qwen35_jax.layers.weights import ONES, RuntimeDtypes, weight
from qwen35_jax.ops import gated_delta_rule, gated_delta_rule_step
from qwen35_jax.ops import sequence_parallel as sp
from qwen35_jax.runtime import Runtime


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


def _conv_with_halo(x_BTC, w_WC, segment_ids_BT, halo_BWC, halo_segment_ids_BW):
    """causal_conv of x after W-1 earlier tokens (the halo), which only feed the taps."""
    x_BSC = jnp.concatenate([halo_BWC.astype(x_BTC.dtype), x_BTC], axis=1)
    seg_BS = jnp.concatenate([halo_segment_ids_BW, segment_ids_BT], axis=1)
    return causal_conv(x_BSC, w_WC, seg_BS)[:, halo_BWC.shape[1] :]


def last_window(x_BTC: jax.Array, segment_ids_BT: jax.Array, count: int) -> jax.Array:
    """The last `count` tokens of each row's last document, [B, count, ...]; zeros before the
    document start. Trailing padding (segment 0) is skipped."""
    b, t = segment_ids_BT.shape
    pos_BT = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    last_B = jnp.max(jnp.where(segment_ids_BT != 0, pos_BT, -1), axis=1)
    idx_BW = last_B[:, None] - (count - 1) + jnp.arange(count)[None, :]
    safe_BW = jnp.clip(idx_BW, 0, t - 1)
    rows_B1 = jnp.arange(b)[:, None]
    last_seg_B = segment_ids_BT[jnp.arange(b), jnp.maximum(last_B, 0)]
    keep_BW = (idx_BW >= 0) & (segment_ids_BT[rows_B1, safe_BW] == last_seg_B[:, None])
    keep_BW = keep_BW & (last_B >= 0)[:, None]
    trailing = (1,) * (x_BTC.ndim - 2)
    return jnp.where(keep_BW.reshape(b, count, *trailing), x_BTC[rows_B1, safe_BW], 0)


def _conv_features(qp, kp, vp, cq, ck, cv, segment_ids_BT, rep, dtype, halos=None, halo_seg=None):
    """Conv (after the halos, if given), SiLU, l2norm, key heads repeated to the value heads.

    Returns (q_BTHK, k_BTHK, v_BTHV). Without halos this is exactly the layer's plain path.
    """
    if halos is None:
        convs = (causal_conv(x, w, segment_ids_BT) for x, w in ((qp, cq), (kp, ck), (vp, cv)))
    else:
        convs = (
            _conv_with_halo(x, w, segment_ids_BT, h, halo_seg)
            for x, w, h in zip((qp, kp, vp), (cq, ck, cv), halos, strict=True)
        )
    q_BTJK, k_BTJK, v_BTHV = (jax.nn.silu(y) for y in convs)
    q_BTHK = jnp.repeat(l2_normalize(q_BTJK), rep, axis=2).astype(dtype)
    k_BTHK = jnp.repeat(l2_normalize(k_BTJK), rep, axis=2).astype(dtype)
    return q_BTHK, k_BTHK, v_BTHV


def _halo_conv_features(rep: int, dtype: jnp.dtype):
    """`_conv_features` of one device's slice after the W-1 tokens of the previous slice: the
    `features` of `sequence_parallel_gated_delta_rule`."""

    def features(qp, kp, vp, seg, cq, ck, cv):
        width = cq.shape[0]
        halo_seg = sp.previous_tokens(seg, width - 1, fill=-1)  # -1: no document before
        halos = tuple(sp.previous_tokens(x, width - 1) for x in (qp, kp, vp))
        return _conv_features(qp, kp, vp, cq, ck, cv, seg, rep, dtype, halos, halo_seg)

    return features


@functools.cache
def _log_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def _splits_over_sequence(t: int, z: int, width: int) -> bool:
    """Whether T tokens split into Z slices of at least W-1 tokens (the conv halo). When not,
    the single-device path is right (generation and evaluation see any length; training
    lengths are checked by the trainer's config validation), and this says so once."""
    if t % z == 0 and t // z >= width - 1:
        return True
    _log_once(
        f"Gated DeltaNet: T={t} tokens do not split over the mesh axis "
        f"{sp.sequence_axis()}={z} into slices of >= {width - 1} tokens; running the "
        "single-device path (correct, not sequence-parallel)"
    )
    return False


def _every_position(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV):
    """T tokens by `gated_delta_rule_step` in sequence: (o_BTHV, the state after every
    position [B, T, H, K, V] float32)."""

    def step(state_BHKV, xs):
        o_BHV, state_BHKV = gated_delta_rule_step(*xs, state_BHKV)
        return state_BHKV, (o_BHV, state_BHKV)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
    _, (o_TBHV, states_TBHKV) = jax.lax.scan(step, state_BHKV, xs)
    return jnp.moveaxis(o_TBHV, 0, 1), jnp.moveaxis(states_TBHKV, 0, 1)


def _continue(feats, g_BTH, beta_BTH, cache, chunk, every_position=False):
    """T tokens continuing each row's cached document: (o_BTHV, state_BHKV, conv windows);
    every_position: (o_BTHV, states_BTHKV, halo + inputs [B, W-1+T, ...]), see the class."""
    qp, kp, vp = feats[:3]
    b, t = g_BTH.shape[:2]
    halos = (cache.conv_q, cache.conv_k, cache.conv_v)
    halo_seg_BW = jnp.ones((b, halos[0].shape[1]), jnp.int32)
    q_BTHK, k_BTHK, v_BTHV = _conv_features(*feats, halos, halo_seg_BW)
    if every_position:
        o_BTHV, states = _every_position(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, cache.state)
        extended = tuple(
            jnp.concatenate([h.astype(x.dtype), x], axis=1)
            for h, x in zip(halos, (qp, kp, vp), strict=True)
        )
        return o_BTHV, states, extended
    if t == 1:
        o_BHV, state_BHKV = gated_delta_rule_step(
            q_BTHK[:, 0], k_BTHK[:, 0], v_BTHV[:, 0], g_BTH[:, 0], beta_BTH[:, 0], cache.state
        )
        o_BTHV = o_BHV[:, None]
    else:
        o_BTHV, state_BHKV = gated_delta_rule(
            q_BTHK,
            k_BTHK,
            v_BTHV,
            g_BTH,
            beta_BTH,
            initial_state=cache.state,
            chunk_size=chunk,
            return_final_state=True,
        )
    windows = tuple(
        jnp.concatenate([h.astype(x.dtype), x], axis=1)[:, t:]
        for h, x in zip(halos, (qp, kp, vp), strict=True)
    )
    return o_BTHV, state_BHKV, windows


class GDNCache(NamedTuple):
    """Decoding cache of one Gated DeltaNet layer (J key heads, H value heads, W conv width)."""

    conv_q: jax.Array  # [B, W-1, J, K] last conv inputs (pre-conv projections), oldest first
    conv_k: jax.Array  # [B, W-1, J, K]
    conv_v: jax.Array  # [B, W-1, H, V]
    state: jax.Array  # [B, H, K, V] float32 recurrent state


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 0.01, 16.0))


def _conv_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class GatedDeltaNet(RuntimeDtypes, nn.Module):
    config: TextConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        segment_ids_BT: jax.Array | None,
        cache: GDNCache | None = None,
        *,
        return_cache: bool = False,
        every_position: bool = False,
    ) -> jax.Array | tuple[jax.Array, GDNCache]:
        """y_BTD; with `return_cache` (prefill) or a `cache` (decode), (y_BTD, new cache).

        With a cache the T tokens continue each row's cached document: `segment_ids_BT` must be
        None (no padding, no document starts). every_position (with a cache; speculative
        verification): the returned cache holds the state after every position, state
        [B, T, H, K, V] (by T `gated_delta_rule_step`s), and conv_* = [B, W-1+T, ...], the old
        window followed by the T new inputs: the window after position t is [t+1, t+W).
        """
        c = self.config
        d, w = c.hidden_size, c.linear_conv_kernel_dim
        nk, nv = c.linear_num_key_heads, c.linear_num_value_heads
        kd, vd = c.linear_key_head_dim, c.linear_value_head_dim

        p = functools.partial(weight, self)
        wq = p("in_proj_q", (d, nk, kd), ("embed", "heads", "head_dim"))
        wk = p("in_proj_k", (d, nk, kd), ("embed", "heads", "head_dim"))
        wv = p("in_proj_v", (d, nv, vd), ("embed", "heads", "head_dim"))
        wz = p("in_proj_z", (d, nv, vd), ("embed", "heads", "head_dim"))
        wb = p("in_proj_b", (d, nv), (None, "heads"))
        wa = p("in_proj_a", (d, nv), (None, "heads"))
        cq = p("conv_q", (w, nk, kd), ("conv", "heads", "head_dim"), _conv_init)
        ck = p("conv_k", (w, nk, kd), ("conv", "heads", "head_dim"), _conv_init)
        cv = p("conv_v", (w, nv, vd), ("conv", "heads", "head_dim"), _conv_init)
        a_log = p("A_log", (nv,), ("heads",), _a_log_init, cast=False)
        dt_bias = p("dt_bias", (nv,), ("heads",), ONES, cast=False)
        wo = p("out_proj", (nv, vd, d), ("heads", "head_dim", "embed"))

        b, t = x_BTD.shape[:2]
        if cache is not None:
            if segment_ids_BT is not None:
                raise ValueError(
                    "GatedDeltaNet with a cache continues one document per row: "
                    "pass segment_ids_BT=None"
                )
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        else:
            # padding positions are zeroed first, as the reference does
            x_BTD = jnp.where((segment_ids_BT != 0)[..., None], x_BTD, 0)
        x_BTD = x_BTD.astype(self.dtype)
        qp_BTJK = jnp.einsum("btd,djk->btjk", x_BTD, wq)
        kp_BTJK = jnp.einsum("btd,djk->btjk", x_BTD, wk)
        vp_BTHV = jnp.einsum("btd,dhv->bthv", x_BTD, wv)
        z_BTHV = jnp.einsum("btd,dhv->bthv", x_BTD, wz)
        b_BTH = jnp.einsum("btd,dh->bth", x_BTD, wb)
        a_BTH = jnp.einsum("btd,dh->bth", x_BTD, wa)

        beta_BTH = jax.nn.sigmoid(b_BTH.astype(jnp.float32))
        g_BTH = -jnp.exp(a_log.astype(jnp.float32))[None, None, :] * jax.nn.softplus(
            a_BTH.astype(jnp.float32) + dt_bias.astype(jnp.float32)[None, None, :]
        )
        rep = nv // nk
        feats = (qp_BTJK, kp_BTJK, vp_BTHV, cq, ck, cv, segment_ids_BT, rep, self.dtype)

        z = sp.sequence_axis_size()
        if cache is not None:
            o_BTHV, state_BHKV, windows = _continue(
                feats, g_BTH, beta_BTH, cache, self.runtime.gdn_chunk_size, every_position
            )
        elif z > 1 and not self.is_initializing() and _splits_over_sequence(t, z, w):
            o_BTHV, state_BHKV = sp.sequence_parallel_gated_delta_rule(
                qp_BTJK,
                kp_BTJK,
                vp_BTHV,
                g_BTH,
                beta_BTH,
                segment_ids=segment_ids_BT,
                chunk_size=self.runtime.gdn_chunk_size,
                return_final_state=True,
                features=_halo_conv_features(rep, self.dtype),
                feature_params=(cq, ck, cv),
            )  # o in vp's dtype, as the plain path's
        else:
            q_BTHK, k_BTHK, v_BTHV = _conv_features(*feats)
            o_BTHV = gated_delta_rule(
                q_BTHK,
                k_BTHK,
                v_BTHV,
                g_BTH,
                beta_BTH,
                segment_ids=segment_ids_BT,
                chunk_size=self.runtime.gdn_chunk_size,
                return_final_state=return_cache,
            )
            if return_cache:
                o_BTHV, state_BHKV = o_BTHV
        if cache is None and return_cache:
            windows = tuple(
                last_window(x, segment_ids_BT, w - 1) for x in (qp_BTJK, kp_BTJK, vp_BTHV)
            )

        o_BTHV = GatedRMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(o_BTHV, z_BTHV)
        y_BTD = jnp.einsum("bthv,hvd->btd", o_BTHV.astype(self.dtype), wo)
        if cache is None and not return_cache:
            return y_BTD
        return y_BTD, GDNCache(*windows, state_BHKV)
