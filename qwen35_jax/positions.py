"""3-D (temporal, height, width) rotary positions for text mixed with images and videos.

The same positions as transformers' Qwen3.5 `get_rope_index`, computed with vectorised jnp ops
(no Python loop over tokens or images), so the grids may be traced values:

* A text token advances all three streams by 1: (p, p, p), then p += 1.
* An image with a merged grid t x h' x w' (h' = h / m, w' = w / m; m = spatial merge size) that
  starts at position s gives its tokens (s + frame, s + row, s + col), then p = s + max(h', w').
* A video is split frame by frame (Qwen3.5 separates frames with timestamps): every frame is an
  image of one temporal step, (s, s + row, s + col), then p = s + max(h', w').

Placeholder tokens (`image_token_id`, `video_token_id`) are matched to grids in order of
appearance over the flattened batch (row after row), image tokens to `image_grid_thw` and video
tokens to `video_grid_thw`, exactly as the tower's outputs are scattered into them. A token's
grid and its place in it come from its ordinal among the placeholders of its kind, so adjacent
images need no separator. Padding (segment id 0) gets position 0 and does not advance.

Packed rows: with `segment_ids`, positions restart at 0 at every document start, so each
document gets the positions it would have alone.

In a vectorised form: with a_i the advance of token i (1 for text; max(h', w') on the first token
of an image / video frame, 0 on its other tokens; 0 for padding) and c_i the exclusive cumulative
sum of a within the document, a text token sits at c_i and a vision token's run starts at
s = c_i - (a of the run's first token if i is not that token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen35_jax.config import Qwen35Config


def _grid_coords(
    ordinal_BT: jax.Array, grid_G3: jax.Array, merge: int, split_frames: bool
) -> tuple[jax.Array, ...]:
    """For the k-th placeholder of a kind: (frame, row, col, run start flag, advance)."""
    t_G = grid_G3[:, 0]
    h_G, w_G = grid_G3[:, 1] // merge, grid_G3[:, 2] // merge
    count_G = t_G * h_G * w_G
    end_G = jnp.cumsum(count_G)
    g = jnp.clip(jnp.searchsorted(end_G, ordinal_BT, side="right"), 0, grid_G3.shape[0] - 1)
    local = ordinal_BT - (end_G - count_G)[g]
    hw = jnp.maximum(h_G[g] * w_G[g], 1)
    frame, within = local // hw, local % hw
    row, col = within // jnp.maximum(w_G[g], 1), within % jnp.maximum(w_G[g], 1)
    first = (within == 0) if split_frames else (local == 0)
    if split_frames:
        frame = jnp.zeros_like(frame)
    return frame, row, col, first, jnp.maximum(h_G[g], w_G[g])


def _exclusive_cumsum_per_document(a_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    t = a_BT.shape[1]
    excl_BT = jnp.cumsum(a_BT, axis=1) - a_BT
    idx_BT = jnp.broadcast_to(jnp.arange(t)[None, :], a_BT.shape)
    start_BT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    doc_start_BT = jax.lax.cummax(jnp.where(start_BT, idx_BT, 0), axis=1)
    return excl_BT - jnp.take_along_axis(excl_BT, doc_start_BT, axis=1)


def rope_index(
    config: Qwen35Config,
    input_ids: jax.Array,
    image_grid_thw: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Positions [3, B, T] int32 for `input_ids [B, T]` (see the module docstring).

    Grids are `[n, 3]` (t, h, w in patches, as the processor returns them; placeholders match
    them in order over the flattened batch), or `[B, n_row, 3]` per row (row b's placeholders
    match row b's grids; zero rows pad). `segment_ids`
    (0 = padding) restarts positions per packed document; `attention_mask` (0 = padding) marks
    padding like HF's. Placeholders of a kind whose grids are not given count as text.
    """
    ids_BT = jnp.asarray(input_ids)
    seg_BT = (
        jnp.ones_like(ids_BT, dtype=jnp.int32)
        if segment_ids is None
        else jnp.asarray(segment_ids, jnp.int32)
    )
    if attention_mask is not None:
        seg_BT = jnp.where(jnp.asarray(attention_mask) != 0, seg_BT, 0)
    valid_BT = seg_BT != 0
    merge = config.vision_config.spatial_merge_size if config.vision_config else 2
    shape = ids_BT.shape

    advance_BT = valid_BT.astype(jnp.int32)
    back_BT = jnp.zeros(shape, jnp.int32)  # how far a vision token's run start lies behind c_i
    offsets_3BT = jnp.zeros((3, *shape), jnp.int32)
    for token_id, grid, split in (
        (config.image_token_id, image_grid_thw, False),
        (config.video_token_id, video_grid_thw, True),
    ):
        if grid is None:
            continue
        grid = jnp.asarray(grid, jnp.int32)
        is_BT = (ids_BT == token_id) & valid_BT
        if grid.ndim == 3:  # per-row grids [B, G, 3]: row b's placeholders take row b's grids
            ordinal_BT = jnp.cumsum(is_BT, axis=1) - 1
            coords = jax.vmap(_grid_coords, in_axes=(0, 0, None, None))
            frame, row, col, first, adv = coords(ordinal_BT, grid, merge, split)
        else:
            ordinal_BT = (jnp.cumsum(is_BT.reshape(-1)) - 1).reshape(shape)
            grid_G3 = grid.reshape(-1, 3)
            frame, row, col, first, adv = _grid_coords(ordinal_BT, grid_G3, merge, split)
        advance_BT = jnp.where(is_BT, jnp.where(first, adv, 0), advance_BT)
        back_BT = jnp.where(is_BT & ~first, adv, back_BT)
        offsets_3BT = jnp.where(is_BT[None], jnp.stack([frame, row, col]), offsets_3BT)

    start_BT = _exclusive_cumsum_per_document(advance_BT, seg_BT) - back_BT
    positions_3BT = start_BT[None] + offsets_3BT
    return jnp.where(valid_BT[None], positions_3BT, 0).astype(jnp.int32)


def rope_deltas(positions_3BT: jax.Array, valid_BT: jax.Array) -> jax.Array:
    """Per row: max position + 1 - number of valid tokens, shape [B]. Decoding continues a row
    at position (cache length + delta) on all three streams, as transformers does."""
    top_B = jnp.max(jnp.where(valid_BT[None], positions_3BT, 0), axis=(0, 2))
    return top_B + 1 - jnp.sum(valid_BT, axis=1).astype(positions_3BT.dtype)
