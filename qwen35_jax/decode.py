"""The model with caches: a prefill of right-padded prompts and decode steps that continue them.

    prefill(ids_BT, lengths_B, S)  one pass of the training kernels over the padded prompts
        (chunked delta rule, dense or blocked attention; padding, segment 0, touches no state)
        -> logits of each row's last prompt token [B, V], DecodeState (`decode_state.py`) with
           keys/values in slots [0, T) of S, each GDN layer's conv window and state after the
           row's last prompt token, length_B = lengths_B, rope_delta_B (images: 3-D positions)
    decode_step(state, ids_BT)     T new tokens per row at slots length_B + t, positions
        length_B + rope_delta_B + t on all three rotary streams, attention over the cached
        slots s < length_B and causally over the T new tokens (slots at or beyond length_B,
        a row's padding or rejected drafts, are never read; they are overwritten)
        -> logits [B, T, V], the state with length_B + T

Both are one `lax.scan` over blocks (an inner scan over the block's GDN layers, then its
attention layer) and one over the tail layers, reading the same stacked parameter tree as
training (`model.py`) and the GDN caches stacked the same way; each layer is `DecoderLayer`
applied to its slice of the parameters. The attention caches are one array per block, read in
place through a `lax.switch` on the block index (`layers/attention.BlockKV`); only that small
attention core is repeated per block, so compile time stays flat with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qwen35_jax.config import Qwen35Config
from qwen35_jax.decode_state import DecodeState, KVCache, constrain_decode_state
from qwen35_jax.fusion import VisionInputs, scatter_visual
from qwen35_jax.layers.attention import BlockKV, attention_mask
from qwen35_jax.layers.decoder import FULL, LINEAR, DecoderLayer, LayerContext
from qwen35_jax.layers.gated_deltanet import GDNCache
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.rotary import rotary_cos_sin
from qwen35_jax.model import lm_head_weights
from qwen35_jax.positions import rope_deltas
from qwen35_jax.runtime import Runtime, resolve
from qwen35_jax.vision import VisionTower, vision_rope_theta


def _layer(rt: Runtime, config, kind, params, x_BTD, ctx, cache, prefill: bool, every=False):
    layer = DecoderLayer(config.text_config, kind, rt)
    x_BTD, _, cache = layer.apply(
        {"params": params}, x_BTD, ctx, cache, return_cache=prefill, every_position=every
    )
    return x_BTD, cache


def pad_slots(cache: KVCache, slots: int) -> KVCache:
    """The prompt's keys/values [B, T, G, H] as a cache of S slots (k [B, G, H, S],
    v [B, G, S, H])."""
    t = cache.k.shape[1]
    k_BGHS = jnp.pad(jnp.transpose(cache.k, (0, 2, 3, 1)), ((0, 0),) * 3 + ((0, slots - t),))
    v_BGSH = jnp.pad(jnp.swapaxes(cache.v, 1, 2), ((0, 0), (0, 0), (0, slots - t), (0, 0)))
    return KVCache(k_BGHS, v_BGSH)


def cache_slots(cache: KVCache) -> int:
    """S, the static number of slots of a cache (`pad_slots`' layout)."""
    return cache.v.shape[2]


def write_kv(cache: KVCache, new: KVCache, index_BT: jax.Array) -> KVCache:
    """The cache (k [B, G, H, S], v [B, G, S, H]) with row b's t-th new key/value (new:
    [B, T, G, H]) at slot index_BT[b, t]: a scatter of T slots, in place on a donated or
    loop-carried buffer (slots >= S are dropped)."""
    rows_B1 = jnp.arange(index_BT.shape[0])[:, None]
    k = cache.k.at[rows_B1, :, :, index_BT].set(new.k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[rows_B1, :, index_BT].set(new.v.astype(cache.v.dtype), mode="drop")
    return KVCache(k, v)


def _layers(
    rt, config, params, x_BTD, ctx, state: DecodeState | None, slots, index_BT=None, every=False
):
    """All layers; returns (x_BTD, (linear, full, tail) caches). state None: prefill.

    Decoding reads block j's attention cache where it lies (`BlockKV`: the scan passes the
    block index, the layer's attention switches to that block's array; no copy of a slice)
    and returns the new tokens' keys/values, written into each block's cache afterwards by
    `write_kv` (O(T) per token, in place)."""
    c = config.text_config
    prefill = state is None
    linear = full = tail = None

    def gdn_stack(x_BTD, stacked_params, caches):
        def body(x_BTD, inputs):
            layer_params, cache = inputs
            return _layer(rt, config, LINEAR, layer_params, x_BTD, ctx, cache, prefill, every)

        return lax.scan(body, x_BTD, (stacked_params, caches))

    if c.num_blocks:

        def block(x_BTD, inputs):
            p_block, lin_cache, j = inputs
            lin_new = None
            if c.full_attention_interval > 1:
                x_BTD, lin_new = gdn_stack(x_BTD, p_block["linear_layers"], lin_cache)
            full_cache = None if prefill else BlockKV(state.full, j)
            x_BTD, full_new = _layer(
                rt, config, FULL, p_block["full_layer"], x_BTD, ctx, full_cache, prefill
            )
            return x_BTD, (lin_new, full_new)

        lin_caches = None if prefill else state.linear
        blocks = jnp.arange(c.num_blocks, dtype=jnp.int32)
        x_BTD, (linear, new) = lax.scan(block, x_BTD, (params["blocks"], lin_caches, blocks))
        per_block = [KVCache(new.k[j], new.v[j]) for j in range(c.num_blocks)]
        if prefill:
            full = tuple(pad_slots(kv, slots) for kv in per_block)
        else:
            full = tuple(
                write_kv(cache, kv, index_BT)
                for cache, kv in zip(state.full, per_block, strict=True)
            )
    if c.num_tail_layers:
        x_BTD, tail = gdn_stack(x_BTD, params["tail_layers"], None if prefill else state.tail)
    return x_BTD, (linear, full, tail)


def _rotary(config: Qwen35Config, positions):
    c = config.text_config
    rope = c.rope_parameters
    rotary_dim = int(c.head_dim * rope.partial_rotary_factor)
    return rotary_cos_sin(
        positions, rotary_dim, rope.rope_theta, rope.mrope_section, rope.mrope_interleaved
    )


def _norm(rt: Runtime, config: Qwen35Config, params: dict, x_BTD: jax.Array) -> jax.Array:
    eps = config.text_config.rms_norm_eps
    return RMSNorm(eps, rt.weights_dtype).apply({"params": params["norm"]}, x_BTD)


def head_logits(rt: Runtime, config: Qwen35Config, params: dict, h_BTD: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of final-normed hidden states (the head shared with MTP)."""
    dtype = rt.dtype
    head_DV = lm_head_weights(config, params).astype(dtype)
    return jnp.einsum(
        "btd,dv->btv", h_BTD.astype(dtype), head_DV, preferred_element_type=jnp.float32
    )


def embed(rt: Runtime, config: Qwen35Config, params: dict, ids_BT, vision):
    dtype = rt.dtype
    x_BTD = jnp.take(params["embed_tokens"], ids_BT, axis=0).astype(dtype)
    if vision is not None:
        tower = VisionTower(config.vision_config, vision_rope_theta(config), rt)
        merged_MD = tower.apply(
            {"params": params["visual"]}, vision.pixels_PF.astype(dtype), vision.layout
        )
        x_BTD = scatter_visual(config, x_BTD, ids_BT, merged_MD, vision)
    return x_BTD


def prefill_context(
    config: Qwen35Config, lengths_B: jax.Array, t: int, positions: jax.Array | None = None
) -> tuple[LayerContext, jax.Array]:
    """(the layers' context for right-padded prompts of T slots, positions [3, B, T])."""
    b = lengths_B.shape[0]
    valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    seg_BT = valid_BT.astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos_3BT = positions if positions.ndim == 3 else jnp.broadcast_to(positions, (3, b, t))
    cos_BTR, sin_BTR = _rotary(config, pos_3BT)
    return LayerContext(seg_BT, cos_BTR, sin_BTR, attention_mask(seg_BT), valid_BT), pos_3BT


def decode_context(
    config: Qwen35Config, length_B: jax.Array, rope_delta_B: jax.Array, t: int, slots: int
) -> tuple[LayerContext, jax.Array]:
    """(the layers' context for T new tokens per row after length_B cached ones, their slots
    index_BT): positions length_B + rope_delta_B + t, cache slots s < length_B visible."""
    b = length_B.shape[0]
    index_BT = length_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos_BTR, sin_BTR = _rotary(config, index_BT + rope_delta_B[:, None])
    mask_B1S = jnp.arange(slots)[None, None, :] < length_B[:, None, None]
    ones_BT = jnp.ones((b, t), jnp.int32)
    return LayerContext(ones_BT, cos_BTR, sin_BTR, mask_B1S[:, None, None], ones_BT != 0), index_BT


def prefill(
    config: Qwen35Config,
    params: dict,
    ids_BT: jax.Array,
    lengths_B: jax.Array,
    slots: int,
    *,
    positions: jax.Array | None = None,
    vision: VisionInputs | None = None,
    runtime: Runtime | None = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, DecodeState] | tuple[jax.Array, DecodeState, jax.Array]:
    """Logits [B, V] (float32) of each row's last prompt token and the decode state.

    ids_BT: prompts right-padded to T; lengths_B: prompt lengths (>= 1); slots: S >= T, the
    attention caches' static length. positions: [B, T] or [3, B, T] (default arange; for
    images `positions.rope_index` of the padded prompts, segment ids = valid tokens).
    runtime: dtypes, kernel sizes, MoE dispatch (None: `Runtime()`); decode with the same one.
    return_hidden: also the final-normed hidden states [B, T, D] (the MTP head's input).
    """
    rt = resolve(runtime)
    b, t = ids_BT.shape
    if slots < t:
        raise ValueError(f"slots={slots} must be >= the prompt length {t}")
    ctx, pos_3BT = prefill_context(config, lengths_B, t, positions)
    valid_BT = ctx.valid_BT
    x_BTD = embed(rt, config, params, ids_BT, vision)
    x_BTD, caches = _layers(rt, config, params, x_BTD, ctx, None, slots)
    h_BTD = _norm(rt, config, params, x_BTD)
    last_B1D = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)
    logits_BV = head_logits(rt, config, params, last_B1D)[:, 0]
    state = DecodeState(
        *caches,
        length_B=lengths_B.astype(jnp.int32),
        rope_delta_B=rope_deltas(pos_3BT, valid_BT).astype(jnp.int32),
    )
    if return_hidden:
        return logits_BV, constrain_decode_state(state), h_BTD
    return logits_BV, constrain_decode_state(state)


def decode_step(
    config: Qwen35Config,
    params: dict,
    state: DecodeState,
    ids_BT: jax.Array,
    *,
    runtime: Runtime | None = None,
    every_position: bool = False,
    return_hidden: bool = False,
) -> tuple[jax.Array, DecodeState] | tuple[jax.Array, DecodeState, jax.Array]:
    """Continues every row by the T tokens ids_BT: (logits [B, T, V] float32, new state).

    every_position (speculative verification): the GDN caches of the state hold every
    position's (`GatedDeltaNet`); `keep_positions` then keeps a per-row prefix of the T tokens.
    return_hidden: also the final-normed hidden states [B, T, D] (the MTP head's input).
    """
    rt = resolve(runtime)
    b, t = ids_BT.shape
    slots = cache_slots(state.full[0]) if state.full is not None else 0
    ctx, index_BT = decode_context(config, state.length_B, state.rope_delta_B, t, slots)
    x_BTD = embed(rt, config, params, ids_BT, None)
    x_BTD, caches = _layers(rt, config, params, x_BTD, ctx, state, slots, index_BT, every_position)
    state = DecodeState(*caches, length_B=state.length_B + t, rope_delta_B=state.rope_delta_B)
    h_BTD = _norm(rt, config, params, x_BTD)
    logits_BTV = head_logits(rt, config, params, h_BTD)
    if not every_position:
        state = constrain_decode_state(state)
    if return_hidden:
        return logits_BTV, state, h_BTD
    return logits_BTV, state


def keep_positions(state: DecodeState, keep_B: jax.Array, t: int) -> DecodeState:
    """The state after `decode_step(..., every_position=True)` over T tokens cut back to the
    first keep_B[b] (1..T) of them per row: each GDN layer's state and conv window after
    token keep_B - 1 (selected, not recomputed), length_B - T + keep_B (attention slots beyond
    are stale and never read)."""

    def gdn(cache: GDNCache | None) -> GDNCache | None:
        if cache is None:
            return None
        state_LBTHKV = cache.state
        lead = state_LBTHKV.ndim - 5  # stacked-layer axes
        shape = (1,) * lead + (-1,)
        idx_B = (keep_B - 1).reshape(shape + (1, 1, 1, 1))
        new_state = jnp.take_along_axis(state_LBTHKV, idx_B, axis=lead + 1)
        new_state = jnp.squeeze(new_state, axis=lead + 1)

        def window(ext):
            w1 = ext.shape[lead + 1] - t  # W - 1
            pos_W = keep_B[:, None] + jnp.arange(w1)[None, :]  # [B, W-1]
            pos = pos_W.reshape(shape + (w1, 1, 1))
            return jnp.take_along_axis(ext, pos, axis=lead + 1)

        return GDNCache(window(cache.conv_q), window(cache.conv_k), window(cache.conv_v), new_state)

    out = DecodeState(
        gdn(state.linear),
        state.full,
        gdn(state.tail),
        length_B=state.length_B - t + keep_B,
        rope_delta_B=state.rope_delta_B,
    )
    return constrain_decode_state(out)
