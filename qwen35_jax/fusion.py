"""Early fusion: visual inputs in, placeholder-token embeddings replaced by the tower's output.

    pixels [P, F] (images, then videos; each kind its own, possibly padded, patch budget)
      -> VisionTower (vision.py) -> merged_MD  (M = P / merge^2 rows)
    x_BTD[b, t] = merged_MD[k]               for the k-th image placeholder over the flattened
                                             batch (row after row), k < M_images
    x_BTD[b, t] = merged_MD[M_images + k]    for the k-th video placeholder
Hugging Face's `masked_scatter` of `get_image_features` / `get_video_features` into
`inputs_embeds`, as a gather with static shapes (jittable, grids may be traced). Padding patches
of a budget are never gathered: the number of placeholders equals the number of real tokens.

Per-row form (for training: micro-batch splits and data-parallel shards along B keep each row's
patches with it): pixel values [B, P_row, F] with grids [B, G_row, 3]. Row b's placeholders take
row b's tokens: k-th placeholder of row b -> merged row b * P_row / merge^2 + k. Each row's patch
budget is padded independently (zero patches, zero grid rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen35_jax.config import Qwen35Config
from qwen35_jax.vision import PatchLayout, patch_layout


class VisionInputs(NamedTuple):
    """The tower's inputs, images first then videos (see `vision_inputs`)."""

    pixels_PF: jax.Array  # [P, F] patches of all images, then of all videos
    layout: PatchLayout  # per patch: frame segment and grid place
    num_image_patches: int  # static: the first num_image_patches rows are images
    rows: int  # static: 0 for the flat (HF) form, else B of the per-row form [B, P_row, F]
    replace_images: bool  # static: image placeholders take tower outputs
    replace_videos: bool  # static: video placeholders take tower outputs


def vision_inputs(
    config: Qwen35Config,
    pixel_values: jax.Array | None = None,
    image_grid_thw: jax.Array | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
) -> VisionInputs | None:
    """Packs the Hugging Face style visual arguments for the model (None when there are none).

    The grids may be traced: the layout is computed with jnp ops over the static patch count.
    """
    if pixel_values is None and pixel_values_videos is None:
        return None
    v = config.vision_config
    if v is None:
        raise ValueError("visual inputs were given but the config has no vision_config")
    pixels, layouts, offset = [], [], 0
    rows = 0
    for what, px, grid in (
        ("pixel_values", pixel_values, image_grid_thw),
        ("pixel_values_videos", pixel_values_videos, video_grid_thw),
    ):
        if px is None:
            continue
        if grid is None:
            raise ValueError(f"{what} needs its grid_thw")
        px, grid = jnp.asarray(px), jnp.asarray(grid, jnp.int32)
        if px.ndim == 3:  # per-row form: lay out each row, make frame ids unique per row
            rows = px.shape[0]
            if grid.ndim != 3 or grid.shape[0] != rows:
                raise ValueError(
                    f"{what} [B, P_row, F] needs grids [B, G_row, 3], got {grid.shape}"
                )
            p_row = px.shape[1]
            lay = jax.vmap(patch_layout, in_axes=(0, None, None))(grid, p_row, v.spatial_merge_size)
            row_offset_B1 = (jnp.arange(rows, dtype=jnp.int32) * p_row)[:, None]
            lay = lay._replace(
                segment_P=jnp.where(lay.segment_P > 0, lay.segment_P + row_offset_B1, 0)
            )
            layout = jax.tree.map(lambda a: a.reshape(-1), lay)
            px = px.reshape(-1, px.shape[-1])
        else:
            layout = patch_layout(grid, px.shape[0], v.spatial_merge_size)
        # frame ids of the second kind are offset past every frame id of the first
        seg = jnp.where(layout.segment_P > 0, layout.segment_P + offset, 0)
        pixels.append(px)
        layouts.append(layout._replace(segment_P=seg))
        offset += px.shape[0]
    if len(pixels) == 2 and (jnp.ndim(pixel_values) == 3) != (jnp.ndim(pixel_values_videos) == 3):
        raise ValueError("pixel_values and pixel_values_videos must both be flat or both per row")
    pixels_PF = jnp.concatenate(pixels, axis=0)
    layout = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *layouts)
    n_img = 0 if pixel_values is None else pixels[0].shape[0]
    return VisionInputs(
        pixels_PF, layout, n_img, rows, pixel_values is not None, pixel_values_videos is not None
    )


def scatter_visual(
    config: Qwen35Config,
    x_BTD: jax.Array,
    input_ids_BT: jax.Array,
    merged_MD: jax.Array,
    vis: VisionInputs,
) -> jax.Array:
    """Replace placeholder embeddings by tower outputs, in order over the flattened batch."""
    m2 = config.vision_config.spatial_merge_size**2
    n_img_tokens = vis.num_image_patches // m2
    n_vid_tokens = merged_MD.shape[0] - n_img_tokens
    shape = input_ids_BT.shape
    index_BT = jnp.zeros(shape, jnp.int32)
    take_BT = jnp.zeros(shape, bool)
    for ok, token_id, offset, per_kind in (
        (vis.replace_images, config.image_token_id, 0, n_img_tokens),
        (vis.replace_videos, config.video_token_id, n_img_tokens, n_vid_tokens),
    ):
        if not ok:
            continue
        is_BT = input_ids_BT == token_id
        if vis.rows:  # per row: ordinal within the row, after the rows before it
            row_B1 = jnp.arange(shape[0], dtype=jnp.int32)[:, None] * (per_kind // vis.rows)
            ordinal_BT = jnp.cumsum(is_BT, axis=1) - 1 + row_B1
        else:
            ordinal_BT = (jnp.cumsum(is_BT.reshape(-1)) - 1).reshape(shape)
        index_BT = jnp.where(is_BT, ordinal_BT + offset, index_BT)
        take_BT = take_BT | is_BT
    index_BT = jnp.clip(index_BT, 0, merged_MD.shape[0] - 1)
    visual_BTD = jnp.take(merged_MD.astype(x_BTD.dtype), index_BT, axis=0)
    return jnp.where(take_BT[:, :, None], visual_BTD, x_BTD)


def dummy_vision(config: Qwen35Config) -> VisionInputs:
    """One blank m x m image: builds the tower's parameters at init."""
    v = config.vision_config
    m = v.spatial_merge_size
    grid = jnp.asarray([[1, m, m]], jnp.int32)
    f = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = jnp.zeros((m * m, f), jnp.float32)
    return VisionInputs(pixels, patch_layout(grid, m * m, m), m * m, 0, False, False)


def check_placeholder_counts(
    config: Qwen35Config,
    input_ids: jax.Array,
    image_grid_thw: jax.Array | None,
    video_grid_thw: jax.Array | None,
) -> None:
    """When the inputs are concrete: each kind's placeholders must number sum(t h w) / merge^2
    over its grids (zero rows of a padded budget count nothing). Skipped under jit."""
    m2 = config.vision_config.spatial_merge_size**2
    for what, token_id, grid in (
        ("image", config.image_token_id, image_grid_thw),
        ("video", config.video_token_id, video_grid_thw),
    ):
        if grid is None:
            continue
        try:
            found = int(jnp.sum(jnp.asarray(input_ids) == token_id))  # totals over all rows
            expected = int(jnp.sum(jnp.prod(jnp.asarray(grid).reshape(-1, 3), axis=1))) // m2
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            return  # traced under jit: the caller's data pipeline is trusted
        if found != expected:
            raise ValueError(
                f"{what} features and {what} tokens do not match: {found} "
                f"placeholder tokens, {expected} {what} tokens from the grids"
            )
