"""The model with caches: a prefill of right-padded prompts and decode steps that continue them.

    prefill(ids_BT, lengths_B, S)  one pass of the training kernels over the padded prompts
        (chunked delta rule, dense or blocked attention; padding, segment 0, touches no state)
        -> logits of each row's last prompt token [B, V], DecodeState (`decode_state.py`) with
           keys/values in slots [0, T) of S, each GDN layer's conv window and state after the
           row's last prompt token, length_B = lengths_B, rope_delta_B (images: 3-D positions)
    decode_step(state, ids_BT)     T new tokens per row at slots length_B + t, positions
        length_B + rope_delta_B + t on all three rotary streams, attention over slots
        s <= length_B + t (slots of a row's padding are overwritten before they are visible)
        -> logits [B, T, V], the state with length_B + T

Both are one `lax.scan` over blocks (an inner scan over the block's GDN layers, then its
attention layer) and one over the tail layers, reading the same stacked parameter tree as
training (`model.py`) and the decode state stacked the same way; each layer is `DecoderLayer`
applied to its slice of the parameters. Compile time therefore does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qwen35_jax.config import Qwen35Config
from qwen35_jax.decode_state import DecodeState, KVCache, constrain_decode_state
from qwen35_jax.fusion import VisionInputs, scatter_visual
from qwen35_jax.layers.attention import attention_mask
from qwen35_jax.layers.decoder import FULL, LINEAR, DecoderLayer, LayerContext
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.rotary import rotary_cos_sin
from qwen35_jax.model import lm_head_weights
from qwen35_jax.positions import rope_deltas
from qwen35_jax.runtime import Runtime, resolve
from qwen35_jax.vision import VisionTower, vision_rope_theta


def _layer(rt: Runtime, config, kind: str, params: dict, x_BTD, ctx, cache, prefill: bool):
    layer = DecoderLayer(config.text_config, kind, rt)
    x_BTD, _, cache = layer.apply({"params": params}, x_BTD, ctx, cache, return_cache=prefill)
    return x_BTD, cache


def _pad_slots(cache: KVCache, slots: int) -> KVCache:
    pad = ((0, 0), (0, slots - cache.k.shape[1]), (0, 0), (0, 0))
    return KVCache(jnp.pad(cache.k, pad), jnp.pad(cache.v, pad))


def _layers(rt, config, params, x_BTD, ctx, state: DecodeState | None, slots: int):
    """All layers; returns (x_BTD, (linear, full, tail) caches). state None: prefill."""
    c = config.text_config
    prefill = state is None
    linear = full = tail = None

    def gdn_stack(x_BTD, stacked_params, caches):
        def body(x_BTD, inputs):
            layer_params, cache = inputs
            return _layer(rt, config, LINEAR, layer_params, x_BTD, ctx, cache, prefill)

        return lax.scan(body, x_BTD, (stacked_params, caches))

    if c.num_blocks:

        def block(x_BTD, inputs):
            p_block, lin_cache, full_cache = inputs
            lin_new = None
            if c.full_attention_interval > 1:
                x_BTD, lin_new = gdn_stack(x_BTD, p_block["linear_layers"], lin_cache)
            x_BTD, full_new = _layer(
                rt, config, FULL, p_block["full_layer"], x_BTD, ctx, full_cache, prefill
            )
            if prefill:
                full_new = _pad_slots(full_new, slots)
            return x_BTD, (lin_new, full_new)

        caches = (None, None) if prefill else (state.linear, state.full)
        x_BTD, (linear, full) = lax.scan(block, x_BTD, (params["blocks"], *caches))
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


def _logits(rt: Runtime, config: Qwen35Config, params: dict, x_BTD: jax.Array) -> jax.Array:
    c = config.text_config
    dtype = rt.dtype
    h_BTD = RMSNorm(c.rms_norm_eps, rt.weights_dtype).apply({"params": params["norm"]}, x_BTD)
    head_DV = lm_head_weights(config, params).astype(dtype)
    return jnp.einsum(
        "btd,dv->btv", h_BTD.astype(dtype), head_DV, preferred_element_type=jnp.float32
    )


def _embed(rt: Runtime, config: Qwen35Config, params: dict, ids_BT, vision):
    dtype = rt.dtype
    x_BTD = jnp.take(params["embed_tokens"], ids_BT, axis=0).astype(dtype)
    if vision is not None:
        tower = VisionTower(config.vision_config, vision_rope_theta(config), rt)
        merged_MD = tower.apply(
            {"params": params["visual"]}, vision.pixels_PF.astype(dtype), vision.layout
        )
        x_BTD = scatter_visual(config, x_BTD, ids_BT, merged_MD, vision)
    return x_BTD


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
) -> tuple[jax.Array, DecodeState]:
    """Logits [B, V] (float32) of each row's last prompt token and the decode state.

    ids_BT: prompts right-padded to T; lengths_B: prompt lengths (>= 1); slots: S >= T, the
    attention caches' static length. positions: [B, T] or [3, B, T] (default arange; for
    images `positions.rope_index` of the padded prompts, segment ids = valid tokens).
    runtime: dtypes, kernel sizes, MoE dispatch (None: `Runtime()`); decode with the same one.
    """
    rt = resolve(runtime)
    b, t = ids_BT.shape
    if slots < t:
        raise ValueError(f"slots={slots} must be >= the prompt length {t}")
    valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    seg_BT = valid_BT.astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos_3BT = positions if positions.ndim == 3 else jnp.broadcast_to(positions, (3, b, t))
    cos_BTR, sin_BTR = _rotary(config, pos_3BT)
    ctx = LayerContext(seg_BT, cos_BTR, sin_BTR, attention_mask(seg_BT), valid_BT)
    x_BTD = _embed(rt, config, params, ids_BT, vision)
    x_BTD, caches = _layers(rt, config, params, x_BTD, ctx, None, slots)
    last_BD = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
    logits_BV = _logits(rt, config, params, last_BD)[:, 0]
    state = DecodeState(
        *caches,
        length_B=lengths_B.astype(jnp.int32),
        rope_delta_B=rope_deltas(pos_3BT, valid_BT).astype(jnp.int32),
    )
    return logits_BV, constrain_decode_state(state)


def decode_step(
    config: Qwen35Config,
    params: dict,
    state: DecodeState,
    ids_BT: jax.Array,
    *,
    runtime: Runtime | None = None,
) -> tuple[jax.Array, DecodeState]:
    """Continues every row by the T tokens ids_BT: (logits [B, T, V] float32, new state)."""
    rt = resolve(runtime)
    b, t = ids_BT.shape
    slots = state.full.k.shape[2] if state.full is not None else 0
    index_BT = state.length_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos_BTR, sin_BTR = _rotary(config, index_BT + state.rope_delta_B[:, None])
    mask_BTS = jnp.arange(slots)[None, None, :] <= index_BT[:, :, None]
    ones_BT = jnp.ones((b, t), jnp.int32)
    ctx = LayerContext(ones_BT, cos_BTR, sin_BTR, mask_BTS[:, None, None], ones_BT != 0, index_BT)
    x_BTD = _embed(rt, config, params, ids_BT, None)
    x_BTD, caches = _layers(rt, config, params, x_BTD, ctx, state, slots)
    state = DecodeState(*caches, length_B=state.length_B + t, rope_delta_B=state.rope_delta_B)
    return _logits(rt, config, params, x_BTD), constrain_decode_state(state)
