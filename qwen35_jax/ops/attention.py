"""Blocked (flash-style) causal softmax attention over packed rows, with its own backward.

Same result as `layers.attention.dot_product_attention(q, k, v, attention_mask(segment_ids))`
without materialising [T, S] arrays. Query head n = g * R + r reads key/value head g (N = G * R).
Query rows are processed in blocks of `block_q` tokens, keys in blocks of `block_k`; query block
i visits only the key blocks that start at or before its last token (causal skipping), so the work
is about half of the dense form. For one query row t and key block j (rows of S_j):

    s_j = (q_t . k_s) / sqrt(H)                 float32;  s_j = -inf-like where masked
    mask(t, s) = s <= t  &  seg_t == seg_s  &  seg_s != 0
    m_j = max(m_{j-1}, max_s s_j)                running max
    l_j = exp(m_{j-1} - m_j) l_{j-1} + sum_s exp(s_j - m_j)
    a_j = exp(m_{j-1} - m_j) a_{j-1} + sum_s exp(s_j - m_j) v_s
    out_t = a_last / l_last;   lse_t = m_last + log(l_last)

Backward (flash attention 2), recomputing each block from (q, k, v, out, lse):

    p = exp(s - lse_t) (0 where masked);   D_t = sum_h dout_th out_th
    dv_s += p^T dout;   dp = dout v^T;   ds = p (dp - D) / sqrt(H)
    dq_t += ds k;       dk_s += ds^T q

A padding query (seg_t == 0) has every key masked; the dense form then softmaxes a row of equal
logits, i.e. averages v over all S keys. That value is reproduced here (out_t = mean_s v_s, and
its gradient), outside the custom-vjp core, so both forms agree everywhere.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

NEG = float(jnp.finfo(jnp.float32).min)


def _block_mask(
    segq_BM: jax.Array, segk_BK: jax.Array, q_start: jax.Array, k_start: jax.Array, r: int
) -> jax.Array:
    """[B, 1, M, K] boolean for query rows M = bq * R (row m is token q_start + m // R)."""
    m, k = segq_BM.shape[1], segk_BK.shape[1]
    tq_M = q_start + jnp.arange(m) // r
    tk_K = k_start + jnp.arange(k)
    causal_MK = tq_M[:, None] >= tk_K[None, :]
    same_BMK = segq_BM[:, :, None] == segk_BK[:, None, :]
    key_ok_BK = segk_BK != 0
    return (causal_MK[None] & same_BMK & key_ok_BK[:, None, :])[:, None]


def _num_key_blocks(i: jax.Array, bq: int, bk: int) -> jax.Array:
    """Key blocks that query block i can see: those starting before its end."""
    return ((i + 1) * bq + bk - 1) // bk


def _key_block(
    q_BGMH_i: jax.Array,
    k_BGSH: jax.Array,
    v_BGSH: jax.Array,
    segq_BM_i: jax.Array,
    segk_BS: jax.Array,
    i: jax.Array,
    j: jax.Array,
    bq: int,
    bk: int,
    r: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Key block j seen by query block i: (k, v, scaled float32 scores, mask), shared by the
    forward pass and the backward recomputation."""
    k_BGKH = lax.dynamic_slice_in_dim(k_BGSH, j * bk, bk, axis=2)
    v_BGKH = lax.dynamic_slice_in_dim(v_BGSH, j * bk, bk, axis=2)
    segk_BK = lax.dynamic_slice_in_dim(segk_BS, j * bk, bk, axis=1)
    s_BGMK = jnp.einsum("bgmh,bgkh->bgmk", q_BGMH_i, k_BGKH, preferred_element_type=jnp.float32)
    s_BGMK = s_BGMK * q_BGMH_i.shape[-1] ** -0.5
    mask = _block_mask(segq_BM_i, segk_BK, i * bq, j * bk, r)
    return k_BGKH, v_BGKH, s_BGMK, mask


def _forward(
    q_BGMH: jax.Array,
    k_BGSH: jax.Array,
    v_BGSH: jax.Array,
    segq_BM: jax.Array,
    segk_BS: jax.Array,
    bq: int,
    bk: int,
    r: int,
) -> tuple[jax.Array, jax.Array]:
    """out [B, G, M, H] (v dtype), lse [B, G, M] float32 (+inf on padding rows)."""
    b, g, mtot, h = q_BGMH.shape
    bm = bq * r
    nq = mtot // bm

    def query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        q_BGMH_i = lax.dynamic_slice_in_dim(q_BGMH, i * bm, bm, axis=2)
        segq_BM_i = lax.dynamic_slice_in_dim(segq_BM, i * bm, bm, axis=1)

        def key_block(j: jax.Array, carry: tuple) -> tuple:
            m_BGM, l_BGM, acc_BGMH = carry
            _, v_BGKH, s_BGMK, mask = _key_block(
                q_BGMH_i, k_BGSH, v_BGSH, segq_BM_i, segk_BS, i, j, bq, bk, r
            )
            s_BGMK = jnp.where(mask, s_BGMK, NEG)
            m_new_BGM = jnp.maximum(m_BGM, s_BGMK.max(axis=-1))
            alpha_BGM = jnp.exp(m_BGM - m_new_BGM)
            # Masked entries give exp(NEG - m) = 0 once a row has met a real key; before that
            # they add garbage that alpha = exp(NEG - m_real) = 0 wipes out later.
            p_BGMK = jnp.exp(s_BGMK - m_new_BGM[..., None])
            l_BGM = alpha_BGM * l_BGM + p_BGMK.sum(axis=-1)
            pv_BGMH = jnp.einsum(
                "bgmk,bgkh->bgmh",
                p_BGMK.astype(v_BGSH.dtype),
                v_BGKH,
                preferred_element_type=jnp.float32,
            )
            acc_BGMH = alpha_BGM[..., None] * acc_BGMH + pv_BGMH
            return m_new_BGM, l_BGM, acc_BGMH

        init = (
            jnp.full((b, g, bm), NEG, jnp.float32),
            jnp.zeros((b, g, bm), jnp.float32),
            jnp.zeros((b, g, bm, h), jnp.float32),
        )
        m_BGM, l_BGM, acc_BGMH = lax.fori_loop(0, _num_key_blocks(i, bq, bk), key_block, init)
        out_BGMH = (acc_BGMH / l_BGM[..., None]).astype(v_BGSH.dtype)
        valid_BM = segq_BM_i != 0
        lse_BGM = jnp.where(valid_BM[:, None], m_BGM + jnp.log(l_BGM), jnp.inf)
        return out_BGMH, lse_BGM

    out_QBGMH, lse_QBGM = lax.map(query_block, jnp.arange(nq))
    out_BGMH = jnp.moveaxis(out_QBGMH, 0, 2).reshape(b, g, mtot, h)
    lse_BGM = jnp.moveaxis(lse_QBGM, 0, 2).reshape(b, g, mtot)
    return out_BGMH, lse_BGM


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(
    q_BGMH: jax.Array,
    k_BGSH: jax.Array,
    v_BGSH: jax.Array,
    segq_BM: jax.Array,
    segk_BS: jax.Array,
    bq: int,
    bk: int,
    r: int,
) -> jax.Array:
    return _forward(q_BGMH, k_BGSH, v_BGSH, segq_BM, segk_BS, bq, bk, r)[0]


def _flash_fwd(
    q_BGMH: jax.Array,
    k_BGSH: jax.Array,
    v_BGSH: jax.Array,
    segq_BM: jax.Array,
    segk_BS: jax.Array,
    bq: int,
    bk: int,
    r: int,
) -> tuple[jax.Array, tuple]:
    out_BGMH, lse_BGM = _forward(q_BGMH, k_BGSH, v_BGSH, segq_BM, segk_BS, bq, bk, r)
    return out_BGMH, (q_BGMH, k_BGSH, v_BGSH, segq_BM, segk_BS, out_BGMH, lse_BGM)


def _flash_bwd(bq: int, bk: int, r: int, res: tuple, dout_BGMH: jax.Array) -> tuple:
    q_BGMH, k_BGSH, v_BGSH, segq_BM, segk_BS, out_BGMH, lse_BGM = res
    b, g, mtot, h = q_BGMH.shape
    bm = bq * r
    nq = mtot // bm
    scale = h**-0.5
    delta_BGM = jnp.sum(dout_BGMH.astype(jnp.float32) * out_BGMH.astype(jnp.float32), axis=-1)

    def query_block(carry: tuple, i: jax.Array) -> tuple:
        q_BGMH_i = lax.dynamic_slice_in_dim(q_BGMH, i * bm, bm, axis=2)
        do_BGMH_i = lax.dynamic_slice_in_dim(dout_BGMH, i * bm, bm, axis=2)
        lse_BGM_i = lax.dynamic_slice_in_dim(lse_BGM, i * bm, bm, axis=2)
        delta_BGM_i = lax.dynamic_slice_in_dim(delta_BGM, i * bm, bm, axis=2)
        segq_BM_i = lax.dynamic_slice_in_dim(segq_BM, i * bm, bm, axis=1)

        def key_block(j: jax.Array, inner: tuple) -> tuple:
            dq_BGMH, dk_BGSH, dv_BGSH = inner
            k_BGKH, v_BGKH, s_BGMK, mask = _key_block(
                q_BGMH_i, k_BGSH, v_BGSH, segq_BM_i, segk_BS, i, j, bq, bk, r
            )
            p_BGMK = jnp.where(mask, jnp.exp(s_BGMK - lse_BGM_i[..., None]), 0.0)
            dv_BGKH = jnp.einsum(
                "bgmk,bgmh->bgkh",
                p_BGMK.astype(dout_BGMH.dtype),
                do_BGMH_i,
                preferred_element_type=jnp.float32,
            )
            dp_BGMK = jnp.einsum(
                "bgmh,bgkh->bgmk", do_BGMH_i, v_BGKH, preferred_element_type=jnp.float32
            )
            ds_BGMK = p_BGMK * (dp_BGMK - delta_BGM_i[..., None]) * scale
            dq_BGMH = dq_BGMH + jnp.einsum(
                "bgmk,bgkh->bgmh",
                ds_BGMK.astype(k_BGSH.dtype),
                k_BGKH,
                preferred_element_type=jnp.float32,
            )
            dk_BGKH = jnp.einsum(
                "bgmk,bgmh->bgkh",
                ds_BGMK.astype(q_BGMH.dtype),
                q_BGMH_i,
                preferred_element_type=jnp.float32,
            )
            dk_BGSH = lax.dynamic_update_slice_in_dim(
                dk_BGSH,
                lax.dynamic_slice_in_dim(dk_BGSH, j * bk, bk, axis=2) + dk_BGKH,
                j * bk,
                axis=2,
            )
            dv_BGSH = lax.dynamic_update_slice_in_dim(
                dv_BGSH,
                lax.dynamic_slice_in_dim(dv_BGSH, j * bk, bk, axis=2) + dv_BGKH,
                j * bk,
                axis=2,
            )
            return dq_BGMH, dk_BGSH, dv_BGSH

        dk_BGSH, dv_BGSH = carry
        dq_BGMH = jnp.zeros((b, g, bm, h), jnp.float32)
        dq_BGMH, dk_BGSH, dv_BGSH = lax.fori_loop(
            0, _num_key_blocks(i, bq, bk), key_block, (dq_BGMH, dk_BGSH, dv_BGSH)
        )
        return (dk_BGSH, dv_BGSH), dq_BGMH

    zeros_BGSH = jnp.zeros(k_BGSH.shape, jnp.float32)
    (dk_BGSH, dv_BGSH), dq_QBGMH = lax.scan(query_block, (zeros_BGSH, zeros_BGSH), jnp.arange(nq))
    dq_BGMH = jnp.moveaxis(dq_QBGMH, 0, 2).reshape(b, g, mtot, h)
    return (
        dq_BGMH.astype(q_BGMH.dtype),
        dk_BGSH.astype(k_BGSH.dtype),
        dv_BGSH.astype(v_BGSH.dtype),
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(
    q_BTNH: jax.Array,
    k_BSGH: jax.Array,
    v_BSGH: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Causal grouped-query attention within documents (segment 0 = padding). [B, T, N, H].

    T need not divide the blocks: rows are padded with segment 0 (masked keys, dropped queries).
    Blocks longer than T are shortened to T.
    """
    b, t, n, h = q_BTNH.shape
    s, g = k_BSGH.shape[1], k_BSGH.shape[2]
    if s != t:
        raise ValueError(f"blocked_attention needs S == T (self-attention), got T={t}, S={s}")
    if n % g:
        raise ValueError(f"query heads {n} not a multiple of key/value heads {g}")
    r = n // g
    bq, bk = min(block_q, t), min(block_k, t)
    step = math.lcm(bq, bk)
    tp = -(-t // step) * step
    pad = tp - t

    seg_BT = segment_ids_BT
    q_BTGRH = q_BTNH.reshape(b, t, g, r, h)
    k_BSGH_p, v_BSGH_p = k_BSGH, v_BSGH
    if pad:
        seg_BT = jnp.pad(seg_BT, ((0, 0), (0, pad)))
        q_BTGRH = jnp.pad(q_BTGRH, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k_BSGH_p = jnp.pad(k_BSGH, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_BSGH_p = jnp.pad(v_BSGH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_BGMH = q_BTGRH.transpose(0, 2, 1, 3, 4).reshape(b, g, tp * r, h)
    k_BGSH = k_BSGH_p.transpose(0, 2, 1, 3)
    v_BGSH = v_BSGH_p.transpose(0, 2, 1, 3)
    segq_BM = jnp.repeat(seg_BT, r, axis=1)

    out_BGMH = _flash(q_BGMH, k_BGSH, v_BGSH, segq_BM, seg_BT, bq, bk, r)
    out_BTGRH = out_BGMH.reshape(b, g, tp, r, h).transpose(0, 2, 1, 3, 4)[:, :t]

    # Padding queries: the dense softmax over an all-masked row averages v over every key.
    mean_BGH = jnp.mean(v_BSGH.astype(jnp.float32), axis=1).astype(out_BTGRH.dtype)
    valid_BT = segment_ids_BT != 0
    out_BTGRH = jnp.where(
        valid_BT[:, :, None, None, None], out_BTGRH, mean_BGH[:, None, :, None, :]
    )
    return out_BTGRH.reshape(b, t, n, h)
