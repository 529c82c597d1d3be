"""Gated softmax attention (the full-attention layers).

    q_BTNH, gate_BTNH = split(x @ q_proj)      q_proj: D -> N * 2H, per head [query | gate]
    k_BTGH = x @ k_proj;  v_BTGH = x @ v_proj  G key/value heads, each serving N/G query heads
    q, k = q_norm(q), k_norm(k)                zero-centred RMSNorm over H
    q, k = rope(q), rope(k)                    partial rotary on the first H*partial dims
    p = softmax(q k^T / sqrt(H) + mask)        float32; mask = causal & same document & not pad
    out = (p v) * sigmoid(gate);  y = out @ o_proj       o_proj: N * H -> D

Two forms of p v, equal up to rounding: `dot_product_attention` (dense [B, G, R, T, S] float32
scores, used for short rows) and `ops.attention.blocked_attention` (online softmax over key
blocks, causal block skipping, flash backward; no [T, S] arrays), used when the layer is given
segment ids and T >= `runtime.attention_blocked_min_length` (default 1024; block sizes
`runtime.attention_block_q`, `_block_k`).

Decoding (`KVCache`, static length S): `layer(x, ..., return_cache=True)` (prefill) also returns
the T tokens' keys and values (after k_norm and rotary); `layer(x, cos, sin, mask, cache=c)`
(c a KVCache, or a `BlockKV`: every block's cache and the index of the one to read) attends
over the cache's slots where `mask` [B, 1, 1, T, S] is true (the caller's: the slots
written before, s < length) and causally over the T new tokens themselves, one softmax over
both (`cached_attention`), and returns the T new tokens' keys and values, which the caller
writes into its cache (`decode.py`, in place). The cache is only read: one pass over S slots.
Cached keys lie transposed, k [B, G, H, S], values v [B, G, S, H]: both dots over the cache are
then plain matrix products on the arrays as they lie (q [R*T, H] @ k [H, S], p [R*T, S] @
v [S, H]); with keys [S, H] XLA CPU ran the score dot 2-3x slower (it dominated decoding at
long context).

Parameter names (ours -> Hugging Face `self_attn.*`):
    q_proj [D, N, 2H]   <- q_proj.weight [N*2H, D] (transposed, reshaped)
    k_proj [D, G, H]    <- k_proj.weight;   v_proj [D, G, H] <- v_proj.weight
    o_proj [N, H, D]    <- o_proj.weight [D, N*H]
    q_norm/scale, k_norm/scale <- q_norm.weight, k_norm.weight
    q_bias, k_bias, v_bias, o_bias when attention_bias <- *_proj.bias
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from qwen35_jax.config import TextConfig
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.rotary import apply_rotary
from qwen35_jax.layers.weights import ZEROS, RuntimeDtypes, weight
from qwen35_jax.ops.attention import blocked_attention
from qwen35_jax.runtime import Runtime


class KVCache(NamedTuple):
    """Keys and values of one attention layer (after k_norm and rotary): a decoding cache of S
    static slots, keys k [B, G, H, S] and values v [B, G, S, H] (the layouts the two attention
    dots read as they lie, no transposed copy), or the T new tokens' [B, T, G, H] (both) that a
    layer returns."""

    k: jax.Array  # [B, G, H, S] compute dtype (a cache) or [B, T, G, H] (new tokens)
    v: jax.Array  # [B, G, S, H] (a cache) or [B, T, G, H] (new tokens)


class BlockKV(NamedTuple):
    """The attention caches of every block (nb KVCaches, one pair of arrays each) and the
    block being run: inside the decode scan over blocks, `cached_attention` reads block
    `index`'s cache where it lies (a `lax.switch` over the blocks: the dots take the block's
    own buffer; indexing a stacked [nb, ...] cache copied the layer's slice every token)."""

    caches: tuple[KVCache, ...]
    index: jax.Array  # int32 scalar


def attention_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S] boolean: causal, same document, key not padding."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    key_ok_BS = segment_ids_BT != 0
    mask_BTS = causal_TS[None] & same_BTS & key_ok_BS[:, None, :]
    return mask_BTS[:, None, None, :, :]


def dot_product_attention(
    q_BTNH: jax.Array, k_BSGH: jax.Array, v_BSGH: jax.Array, mask: jax.Array
) -> jax.Array:
    """Grouped-query softmax attention; softmax in float32. Returns [B, T, N, H]."""
    b, t, n, h = q_BTNH.shape
    g = k_BSGH.shape[2]
    q_BTGRH = q_BTNH.reshape(b, t, g, n // g, h)
    logits_BGRTS = jnp.einsum(
        "btgrh,bsgh->bgrts", q_BTGRH, k_BSGH, preferred_element_type=jnp.float32
    )
    logits_BGRTS = logits_BGRTS * (h**-0.5)
    logits_BGRTS = jnp.where(mask, logits_BGRTS, jnp.finfo(jnp.float32).min)
    probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGH.dtype)
    out_BTGRH = jnp.einsum("bgrts,bsgh->btgrh", probs_BGRTS, v_BSGH)
    return out_BTGRH.reshape(b, t, n, h)


def cached_attention(
    q_BTNH: jax.Array,
    cache: KVCache | BlockKV,
    mask: jax.Array,
    k_BTGH: jax.Array,
    v_BTGH: jax.Array,
) -> jax.Array:
    """Decoding attention of T new tokens over the cache slots (cache.k [B, G, H, S], cache.v
    [B, G, S, H]; a `BlockKV`: its block's cache) allowed by `mask` [B, 1, 1, T, S] and causally
    over the new tokens' own keys/values: one float32 softmax over the S + T scores, its two
    parts normalised together (no [S + T] concatenation). Returns [B, T, N, H]. The cache is
    only read, once per dot."""
    if isinstance(cache, BlockKV):
        if len(cache.caches) == 1:
            return cached_attention(q_BTNH, cache.caches[0], mask, k_BTGH, v_BTGH)

        def read(block: KVCache):
            return lambda *args: cached_attention(args[0], block, *args[1:])

        branches = [read(block) for block in cache.caches]
        return lax.switch(cache.index, branches, q_BTNH, mask, k_BTGH, v_BTGH)
    b, t, n, h = q_BTNH.shape
    g = k_BTGH.shape[2]
    dtype = q_BTNH.dtype
    q_BGRTH = jnp.transpose(q_BTNH.reshape(b, t, g, n // g, h), (0, 2, 3, 1, 4))
    floor = jnp.finfo(jnp.float32).min
    old_BGRTS = jnp.einsum(
        "bgrth,bghs->bgrts", q_BGRTH, cache.k.astype(dtype), preferred_element_type=jnp.float32
    )
    new_BGRTU = jnp.einsum("bgrth,bugh->bgrtu", q_BGRTH, k_BTGH, preferred_element_type=jnp.float32)
    old_BGRTS = jnp.where(mask, old_BGRTS * (h**-0.5), floor)
    causal_TU = jnp.tril(jnp.ones((t, t), dtype=bool))
    new_BGRTU = jnp.where(causal_TU, new_BGRTU * (h**-0.5), floor)
    top_BGRT1 = jnp.maximum(
        jnp.max(old_BGRTS, axis=-1, keepdims=True), jnp.max(new_BGRTU, axis=-1, keepdims=True)
    )
    old_BGRTS = jnp.exp(old_BGRTS - top_BGRT1)
    new_BGRTU = jnp.exp(new_BGRTU - top_BGRT1)
    total_BGRT1 = jnp.sum(old_BGRTS, axis=-1, keepdims=True) + jnp.sum(
        new_BGRTU, axis=-1, keepdims=True
    )
    vdt = v_BTGH.dtype
    out_BGRTH = jnp.einsum(
        "bgrts,bgsh->bgrth",
        (old_BGRTS / total_BGRT1).astype(vdt),
        cache.v.astype(vdt),
        preferred_element_type=jnp.float32,
    ) + jnp.einsum(
        "bgrtu,bugh->bgrth",
        (new_BGRTU / total_BGRT1).astype(vdt),
        v_BTGH,
        preferred_element_type=jnp.float32,
    )
    return jnp.transpose(out_BGRTH, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(vdt)


class GatedAttention(RuntimeDtypes, nn.Module):
    config: TextConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        cos_BTR: jax.Array,
        sin_BTR: jax.Array,
        mask: jax.Array | None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | BlockKV | None = None,
        *,
        return_cache: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """mask [B, 1, 1, T, T] from `attention_mask`; segment_ids_BT enables the blocked path.

        Decoding (see the module docstring): with `return_cache`, (y, the T tokens' KVCache);
        with a `cache` (only read), (y, the T new tokens' KVCache).
        """
        c = self.config
        d, n, g, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x_BTD = x_BTD.astype(self.dtype)

        wq = weight(self, "q_proj", (d, n, 2 * h), ("embed", "heads", "head_dim"))
        wk = weight(self, "k_proj", (d, g, h), ("embed", "kv_heads", "head_dim"))
        wv = weight(self, "v_proj", (d, g, h), ("embed", "kv_heads", "head_dim"))
        wo = weight(self, "o_proj", (n, h, d), ("heads", "head_dim", "embed"))
        qg_BTNH2 = jnp.einsum("btd,dnh->btnh", x_BTD, wq)
        k_BTGH = jnp.einsum("btd,dgh->btgh", x_BTD, wk)
        v_BTGH = jnp.einsum("btd,dgh->btgh", x_BTD, wv)
        if c.attention_bias:
            qg_BTNH2 = (
                qg_BTNH2
                + weight(self, "q_bias", (n, 2 * h), ("heads", "head_dim"), ZEROS)[None, None]
            )
            k_BTGH = (
                k_BTGH + weight(self, "k_bias", (g, h), ("kv_heads", "head_dim"), ZEROS)[None, None]
            )
            v_BTGH = (
                v_BTGH + weight(self, "v_bias", (g, h), ("kv_heads", "head_dim"), ZEROS)[None, None]
            )
        q_BTNH, gate_BTNH = qg_BTNH2[..., :h], qg_BTNH2[..., h:]

        q_BTNH = RMSNorm(c.rms_norm_eps, self.param_dtype, name="q_norm")(q_BTNH)
        k_BTGH = RMSNorm(c.rms_norm_eps, self.param_dtype, name="k_norm")(k_BTGH)
        q_BTNH = apply_rotary(q_BTNH, cos_BTR, sin_BTR)
        k_BTGH = apply_rotary(k_BTGH, cos_BTR, sin_BTR)

        t = x_BTD.shape[1]
        rt = self.runtime
        new_cache = KVCache(k_BTGH, v_BTGH)
        if cache is not None:
            out_BTNH = cached_attention(q_BTNH, cache, mask, k_BTGH, v_BTGH)
        elif segment_ids_BT is not None and (t >= rt.attention_blocked_min_length or mask is None):
            out_BTNH = blocked_attention(
                q_BTNH,
                k_BTGH,
                v_BTGH,
                segment_ids_BT,
                block_q=rt.attention_block_q,
                block_k=rt.attention_block_k,
            )
        else:
            if mask is None:
                raise ValueError("GatedAttention needs a mask or segment ids")
            out_BTNH = dot_product_attention(q_BTNH, k_BTGH, v_BTGH, mask)
        out_BTNH = out_BTNH * jax.nn.sigmoid(gate_BTNH.astype(jnp.float32)).astype(self.dtype)
        y_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, wo)
        if c.attention_bias:
            y_BTD = y_BTD + weight(self, "o_bias", (d,), ("embed",), ZEROS)[None, None]
        if cache is not None or return_cache:
            return y_BTD, new_cache
        return y_BTD
