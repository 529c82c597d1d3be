"""Rotary position embedding for the text model: partial, multimodal (3-D), rotate-half.

Only the first `rd = head_dim * partial_rotary_factor` dims of q and k rotate (64 of 256 in the
released models); the rest pass through. Inverse frequencies `inv_freq_j = theta^(-2j/rd)`,
j = 0..rd/2-1.

Multimodal RoPE: positions come as three streams (temporal, height, width), shape [3, B, T]. Each
frequency j reads one stream. Interleaved layout (Qwen3.5, `mrope_interleaved=True`):
    j % 3 == 1 and j < 3*section[1]  -> height;  j % 3 == 2 and j < 3*section[2] -> width;
    otherwise                        -> temporal.
Non-interleaved layout: the first section[0] frequencies read temporal, the next section[1]
height, the next section[2] width. For pure text the three streams are equal and both layouts
are plain RoPE.

    angle_BTJ = pos_stream(j)_BT * inv_freq_j;  cos/sin = [cos(angle), cos(angle)] (length rd)
    rotate(x) = x * cos + rotate_half(x) * sin,  rotate_half([a, b]) = [-b, a]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def stream_of_frequency(
    num_freqs: int, mrope_section: tuple[int, ...], interleaved: bool
) -> np.ndarray:
    """For each rotary frequency, which position stream (0=t, 1=h, 2=w) drives it."""
    stream = np.zeros(num_freqs, dtype=np.int32)
    sec = tuple(mrope_section) + (0,) * (3 - len(mrope_section))
    if interleaved:
        for j in range(num_freqs):
            if j % 3 == 1 and j < 3 * sec[1]:
                stream[j] = 1
            elif j % 3 == 2 and j < 3 * sec[2]:
                stream[j] = 2
    else:
        bounds = np.cumsum(sec)
        for j in range(num_freqs):
            stream[j] = 0 if j < bounds[0] else (1 if j < bounds[1] else 2)
    return stream


def rotary_cos_sin(
    positions: jax.Array,
    rotary_dim: int,
    theta: float,
    mrope_section: tuple[int, ...] = (11, 11, 10),
    interleaved: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [B, T, rotary_dim] in float32.

    `positions` is [B, T] (text: the three streams are equal) or [3, B, T].
    """
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    num_freqs = rotary_dim // 2
    inv_freq_J = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    inv_freq_J = jnp.asarray(inv_freq_J, jnp.float32)
    stream_J = stream_of_frequency(num_freqs, mrope_section, interleaved)
    pos_BTJ = jnp.moveaxis(positions.astype(jnp.float32)[stream_J], 0, -1)  # [B, T, J]
    # positions[stream_J] is [J, B, T]: each frequency takes its own stream
    angle_BTJ = pos_BTJ * inv_freq_J[None, None, :]
    angle_BTR = jnp.concatenate([angle_BTJ, angle_BTJ], axis=-1)
    return jnp.cos(angle_BTR), jnp.sin(angle_BTR)


def apply_rotary(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotate the first R dims of each head (rotate-half convention); the rest pass through."""
    rd = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNH[..., :rd], x_BTNH[..., rd:]
    cos = cos_BTR[:, :, None, :].astype(x_BTNH.dtype)
    sin = sin_BTR[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
