"""The decode state: what generation keeps per row between tokens, stacked like the parameters.

Per attention layer a key/value cache of S static slots (S = prompt bucket + max new tokens);
per Gated DeltaNet layer its conv window (the last W-1 pre-conv q, k, v projections) and its
float32 recurrent state. The layers' caches are stacked exactly as their parameters are, so
decoding scans over blocks with the training parameter tree (no conversion):

    linear  GDNCache  conv_q/conv_k [nb, i-1, B, W-1, J, K], conv_v [nb, i-1, B, W-1, H, V],
                      state [nb, i-1, B, H, K, V] float32     <- params blocks/linear_layers
    full    nb KVCaches  k [B, G, H, S], v [B, G, S, H] each (compute dtype; keys transposed:
                      both attention dots read the arrays as they lie) <- params blocks/full_layer
    tail    GDNCache  as `linear` with one leading axis [r]   <- params tail_layers
    length_B  int32 [B]  tokens of row b in the caches (its next token goes to slot length_B)
    rope_delta_B  int32 [B]  row b's next token has position length_B + rope_delta_B on all
                  three rotary streams (0 for text; `positions.rope_deltas` after images)

The attention caches are a tuple of one array per block, not one stacked array: the scan over
blocks reads block j's cache in place (`layers/attention.BlockKV`), where slicing a stacked
[nb, ...] cache copied the layer's keys and values every token (XLA CPU does not fuse a
dynamic slice into a dot).

(nb blocks of i = full_attention_interval layers, r = num_tail_layers; axis letters in
`qwen35_jax/__init__.py`; here H is the GDN value heads in GDNCache and the attention head dim
in KVCache.) Size in bytes: `decode_state_bytes`; logical axis names for sharding:
`decode_state_axes` (rows over the batch mesh axes, heads over `tensor`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax import sharding
from qwen35_jax.config import Qwen35Config
from qwen35_jax.layers.attention import KVCache
from qwen35_jax.layers.gated_deltanet import GDNCache
from qwen35_jax.runtime import Runtime, resolve


class DecodeState(NamedTuple):
    linear: GDNCache | None  # leaves [nb, i-1, B, ...]; None when there are no blocks or i = 1
    full: tuple[KVCache, ...] | None  # one per block (k [B, G, H, S], v [B, G, S, H]) or None
    tail: GDNCache | None  # leaves [r, B, ...]; None when r = 0
    length_B: jax.Array  # int32 [B]
    rope_delta_B: jax.Array  # int32 [B]


def _gdn_shapes(config, dt, lead: tuple[int, ...], batch: int) -> GDNCache:
    c = config.text_config
    w, nk, nv = c.linear_conv_kernel_dim, c.linear_num_key_heads, c.linear_num_value_heads
    kd, vd = c.linear_key_head_dim, c.linear_value_head_dim
    s = jax.ShapeDtypeStruct
    return GDNCache(
        s((*lead, batch, w - 1, nk, kd), dt),
        s((*lead, batch, w - 1, nk, kd), dt),
        s((*lead, batch, w - 1, nv, vd), dt),
        s((*lead, batch, nv, kd, vd), jnp.float32),
    )


def abstract_decode_state(
    config: Qwen35Config, batch: int, max_length: int, *, runtime: Runtime | None = None
) -> DecodeState:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`) of the decode state for `batch` rows and
    `max_length` cache slots per attention layer (caches in the runtime's compute dtype)."""
    c = config.text_config
    nb, i, r = c.num_blocks, c.full_attention_interval, c.num_tail_layers
    dt = resolve(runtime).dtype
    g, h = c.num_key_value_heads, c.head_dim
    k = jax.ShapeDtypeStruct((batch, g, h, max_length), dt)
    v = jax.ShapeDtypeStruct((batch, g, max_length, h), dt)
    row = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return DecodeState(
        linear=_gdn_shapes(config, dt, (nb, i - 1), batch) if nb and i > 1 else None,
        full=tuple(KVCache(k, v) for _ in range(nb)) if nb else None,
        tail=_gdn_shapes(config, dt, (r,), batch) if r else None,
        length_B=row,
        rope_delta_B=row,
    )


def decode_state_bytes(
    config: Qwen35Config, batch: int, max_length: int, *, runtime: Runtime | None = None
) -> int:
    """Bytes of the decode state (all layers, all rows), from its shapes alone."""
    leaves = jax.tree.leaves(abstract_decode_state(config, batch, max_length, runtime=runtime))
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def init_decode_state(
    config: Qwen35Config, batch: int, max_length: int, *, runtime: Runtime | None = None
) -> DecodeState:
    """An all-zero state (empty caches, length 0)."""
    shapes = abstract_decode_state(config, batch, max_length, runtime=runtime)
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


_GDN_AXES = GDNCache(
    ("batch", None, "heads", None),
    ("batch", None, "heads", None),
    ("batch", None, "heads", None),
    ("batch", "heads", None, None),
)
_KV_AXES = ("batch", "kv_heads", None, None)


def decode_state_axes(state: DecodeState) -> DecodeState:
    """Logical axis names of every leaf (stacked-layer axes never sharded), for `sharding`."""

    def gdn(cache: GDNCache | None, lead: int) -> GDNCache | None:
        if cache is None:
            return None
        return GDNCache(*((None,) * lead + axes for axes in _GDN_AXES))

    return DecodeState(
        linear=gdn(state.linear, 2),
        full=None if state.full is None else tuple(KVCache(_KV_AXES, _KV_AXES) for _ in state.full),
        tail=gdn(state.tail, 1),
        length_B=("batch",),
        rope_delta_B=("batch",),
    )


def leaf_axes(state: DecodeState) -> list[tuple[str | None, ...]]:
    """The logical axis names of `state`'s leaves, in `jax.tree.leaves` order."""

    def is_names(x) -> bool:
        return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)

    return jax.tree.leaves(decode_state_axes(state), is_leaf=is_names)


def constrain_decode_state(state: DecodeState) -> DecodeState:
    """Pins the state's layout to the table's (rows over the batch axes) under a set mesh;
    a no-op without one."""
    flat, treedef = jax.tree.flatten(state)
    out = [sharding.constrain(x, a) for x, a in zip(flat, leaf_axes(state), strict=True)]
    return jax.tree.unflatten(treedef, out)
