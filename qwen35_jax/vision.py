"""The vision tower and merger: pixels of images / video frames -> tokens of the text width.

Axis letters here (besides the package legend): P patches, M merged tokens (P / merge^2),
F pixel features per patch (in_channels * temporal_patch_size * patch_size^2), W vision width
(`vision_config.hidden_size`), N vision heads, H vision head dim (W / N), I vision MLP width,
D text width (`out_hidden_size`), G grids (one per image or video), m the spatial merge size.

Input: `pixels_PF`, the patches of every image and video concatenated (as `processor.py` lays
them out: per grid t x h x w patches, frame-major, each frame in m x m merge-block order), and
the grids `grid_thw [G, 3]` (patches per side). Everything that depends on the grids is computed
by `patch_layout` with jnp ops over a static number of patches, so the grids may be traced
values and a fixed patch budget may be padded (padding patches have segment 0).

    x_PW   = pixels_PF @ patch_embed + b              Conv3d with stride = kernel, i.e. a linear map
    x_PW  += bilinear(pos_embed, row, col)            learned S x S table (S^2 = num_position_
                                                      embeddings), resampled to each frame's h x w
                                                      grid, align_corners=True: src = i (S-1)/(n-1)
    for each of `depth` blocks (pre-LayerNorm, eps 1e-6):
        q, k, v = split(LN1(x) @ qkv + b)             [P, N, H] each
        q, k    = rot(q), rot(k)                      2-D rotary over all H dims: frequencies
                                                      f_j = theta^(-4j/H), j < H/4; angles
                                                      [row f, col f, row f, col f] (rotate-half)
        x += softmax(q k^T / sqrt(H) + mask) v @ proj + b    mask: same image / same video frame
        x += gelu_tanh(LN2(x) @ fc1 + b1) @ fc2 + b2
    merged_MD = gelu(reshape(LN(x), [M, m^2 W]) @ fc1 + b1) @ fc2 + b2      exact GELU

Parameter tree (ours -> Hugging Face `model.visual.*`; kernels are transposed Linear weights):
    patch_embed/kernel [F, W]           <- patch_embed.proj.weight [W, C, Tp, ps, ps] (reshaped)
    patch_embed/bias [W]                <- patch_embed.proj.bias
    pos_embed [S^2, W]                  <- pos_embed.weight
    blocks/norm1/{scale,bias} [L, W]    <- blocks.{i}.norm1.{weight,bias}   (and norm2)
    blocks/attn/qkv/kernel [L, W, 3, N, H], bias [L, 3, N, H]  <- blocks.{i}.attn.qkv.*
    blocks/attn/proj/kernel [L, N, H, W], bias [L, W]          <- blocks.{i}.attn.proj.*
    blocks/linear_fc1/kernel [L, W, I], bias; blocks/linear_fc2/kernel [L, I, W], bias
                                        <- blocks.{i}.mlp.linear_fc{1,2}.*
    merger/norm/{scale,bias} [W]        <- merger.norm.{weight,bias}
    merger/linear_fc1/kernel [m^2 W, m^2 W], bias; merger/linear_fc2/kernel [m^2 W, D], bias
                                        <- merger.linear_fc{1,2}.*
The blocks are an nn.scan over `depth` stacked layers (compile time does not grow with depth).
Attention is dense over all P patches with a same-frame mask ([N, P, P] logits): fine for the
image sizes of tests and demos; a segment-aware blockwise kernel is the follow-up for long videos.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.config import Qwen35Config, VisionConfig
from qwen35_jax.layers.decoder import REMAT_POLICIES
from qwen35_jax.layers.rotary import apply_rotary
from qwen35_jax.layers.weights import ONES, ZEROS, RuntimeDtypes, weight
from qwen35_jax.runtime import Runtime

DEFAULT_ROPE_THETA = 10_000.0
LAYER_NORM_EPS = 1e-6


class PatchLayout(NamedTuple):
    """Where every patch sits: its frame (segment) and its place in that frame's grid."""

    segment_P: jax.Array  # int32, 1.. per frame of every grid (global); 0 = padding patch
    row_P: jax.Array  # int32, patch row within its frame
    col_P: jax.Array  # int32, patch column within its frame
    height_P: jax.Array  # int32, patch rows of its frame (h of its grid)
    width_P: jax.Array  # int32, patch columns of its frame (w of its grid)


def patch_layout(grid_thw_G3: jax.Array, num_patches: int, merge_size: int) -> PatchLayout:
    """The layout of `num_patches` patches for grids `[G, 3]` (t, h, w in patches).

    Works on traced grids (the shapes depend only on `num_patches`). Patches past the grids'
    total (a padded budget) get segment 0. Within a frame, patch `i` is in merge-block order:
    block (i // m^2) in raster order over the (h/m) x (w/m) blocks, then (i % m^2) in raster
    order inside the block.
    """
    m = merge_size
    grid_G3 = jnp.asarray(grid_thw_G3, jnp.int32).reshape(-1, 3)
    t_G, h_G, w_G = grid_G3[:, 0], grid_G3[:, 1], grid_G3[:, 2]
    count_G = t_G * h_G * w_G
    end_G = jnp.cumsum(count_G)
    frames_before_G = jnp.cumsum(t_G) - t_G
    p_P = jnp.arange(num_patches, dtype=jnp.int32)
    g_P = jnp.clip(jnp.searchsorted(end_G, p_P, side="right"), 0, grid_G3.shape[0] - 1)
    valid_P = p_P < end_G[-1]
    local_P = p_P - (end_G - count_G)[g_P]
    h_P, w_P = h_G[g_P], w_G[g_P]
    frame_size_P = jnp.maximum(h_P * w_P, 1)
    frame_P, within_P = local_P // frame_size_P, local_P % frame_size_P
    blocks_w_P = jnp.maximum(w_P // m, 1)
    block_P, inner_P = within_P // (m * m), within_P % (m * m)
    row_P = (block_P // blocks_w_P) * m + inner_P // m
    col_P = (block_P % blocks_w_P) * m + inner_P % m
    segment_P = jnp.where(valid_P, frames_before_G[g_P] + frame_P + 1, 0)
    return PatchLayout(segment_P, row_P, col_P, h_P, w_P)


def vision_rope_theta(config: Qwen35Config) -> float:
    """The vision rotary base: `vision_config.rope_parameters.rope_theta` when the HF config
    carries it (kept in `config.extra`), else transformers' default 10000."""
    extra = dict(config.extra)
    rope = json.loads(extra.get("vision_config.rope_parameters", "null")) or {}
    return float(rope.get("rope_theta", DEFAULT_ROPE_THETA))


def vision_rotary(layout: PatchLayout, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [P, H]: frequencies theta^(-4j/H) (j < H/4) on (row, col)."""
    quarter = head_dim // 4
    inv_freq_J = 1.0 / (theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2.0 / (head_dim // 2)))
    row_PJ = layout.row_P.astype(jnp.float32)[:, None] * inv_freq_J[None, :]
    col_PJ = layout.col_P.astype(jnp.float32)[:, None] * inv_freq_J[None, :]
    angle_PH = jnp.concatenate([row_PJ, col_PJ, row_PJ, col_PJ], axis=-1)
    return jnp.cos(angle_PH), jnp.sin(angle_PH)


def interpolation_taps(layout: PatchLayout, side: int) -> tuple[jax.Array, jax.Array]:
    """Bilinear (align_corners=True) taps into the S x S position table: indices and weights,
    each [P, 4] (taps ordered (r0,c0), (r0,c1), (r1,c0), (r1,c1))."""

    def axis(index_P, size_P):
        src_P = (
            index_P.astype(jnp.float32)
            * (side - 1)
            / jnp.maximum(size_P - 1, 1).astype(jnp.float32)
        )
        floor_P = jnp.floor(src_P)
        offsets = jnp.arange(2, dtype=jnp.float32)
        taps_P2 = jnp.clip(floor_P[:, None].astype(jnp.int32) + jnp.arange(2)[None, :], 0, side - 1)
        dist_P2 = jnp.abs(src_P[:, None] - floor_P[:, None] - offsets[None, :])
        return taps_P2, jnp.maximum(1.0 - dist_P2, 0.0)

    rt_P2, rw_P2 = axis(layout.row_P, layout.height_P)
    ct_P2, cw_P2 = axis(layout.col_P, layout.width_P)
    n = rt_P2.shape[0]
    idx_P4 = (rt_P2[:, :, None] * side + ct_P2[:, None, :]).reshape(n, 4)
    w_P4 = (rw_P2[:, :, None] * cw_P2[:, None, :]).reshape(n, 4)
    return idx_P4, w_P4


class LayerNorm(nn.Module):
    """Standard LayerNorm (mean and variance over the last axis, scale and bias), in float32."""

    eps: float = LAYER_NORM_EPS
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = weight(self, "scale", (d,), ("norm",), ONES, cast=False)
        bias = weight(self, "bias", (d,), ("norm",), ZEROS, cast=False)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32)[None, :] + bias.astype(jnp.float32)[None, :]
        return y.astype(x.dtype)


class Dense(nn.Module):
    """y = x @ kernel + bias, kernel [*in_shape, *out_shape]: contracts the trailing
    len(in_shape) axes of x, e.g. x [P, W] -> [P, 3, N, H] (qkv) or x [P, N, H] -> [P, W]."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nin, nout = len(self.in_shape), len(self.out_shape)
        kernel = weight(self, "kernel", (*self.in_shape, *self.out_shape), self.axes)
        bias = weight(self, "bias", self.out_shape, self.axes[nin:], ZEROS)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel,
            (((tuple(range(x.ndim - nin, x.ndim))), tuple(range(nin))), ((), ())),
        )
        return y + bias.reshape((1,) * (y.ndim - nout) + self.out_shape)


class BlockContext(NamedTuple):
    cos_PH: jax.Array
    sin_PH: jax.Array
    mask_PP: jax.Array  # bool: query and key patches in the same frame


def _rotate(x_PNH: jax.Array, cos_PH: jax.Array, sin_PH: jax.Array) -> jax.Array:
    """Rotary in float32 over all H dims (rotate-half), cast back."""
    y = apply_rotary(x_PNH.astype(jnp.float32)[None], cos_PH[None], sin_PH[None])[0]
    return y.astype(x_PNH.dtype)


class VisionAttention(nn.Module):
    """Bidirectional softmax attention restricted by `mask_PP` (one image or video frame)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_PW: jax.Array, ctx: BlockContext) -> jax.Array:
        c = self.config
        w, n = c.hidden_size, c.num_heads
        h = w // n
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_P3NH = Dense((w,), (3, n, h), ("embed", None, "heads", "head_dim"), **kw, name="qkv")(
            x_PW
        )
        q_PNH = _rotate(qkv_P3NH[:, 0], ctx.cos_PH, ctx.sin_PH)
        k_PNH = _rotate(qkv_P3NH[:, 1], ctx.cos_PH, ctx.sin_PH)
        v_PNH = qkv_P3NH[:, 2]
        logits_NPS = jnp.einsum("pnh,snh->nps", q_PNH, k_PNH, preferred_element_type=jnp.float32)
        logits_NPS = jnp.where(
            ctx.mask_PP[None], logits_NPS * (h**-0.5), jnp.finfo(jnp.float32).min
        )
        probs_NPS = jax.nn.softmax(logits_NPS, axis=-1).astype(v_PNH.dtype)
        out_PNH = jnp.einsum("nps,snh->pnh", probs_NPS, v_PNH)
        return Dense((n, h), (w,), ("heads", "head_dim", "embed"), **kw, name="proj")(out_PNH)


class VisionBlock(nn.Module):
    """x += attn(norm1(x)); x += fc2(gelu_tanh(fc1(norm2(x))))."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_PW: jax.Array, ctx: BlockContext) -> tuple[jax.Array, None]:
        c = self.config
        w, i = c.hidden_size, c.intermediate_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y_PW = LayerNorm(param_dtype=self.param_dtype, name="norm1")(x_PW)
        x_PW = x_PW + VisionAttention(c, **kw, name="attn")(y_PW, ctx)
        y_PW = LayerNorm(param_dtype=self.param_dtype, name="norm2")(x_PW)
        y_PI = Dense((w,), (i,), ("embed", "mlp"), **kw, name="linear_fc1")(y_PW)
        y_PI = _activation(c.hidden_act, y_PI)
        x_PW = x_PW + Dense((i,), (w,), ("mlp", "embed"), **kw, name="linear_fc2")(y_PI)
        return x_PW, None


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"vision_config.hidden_act={name!r} is not supported")


class VisionTower(RuntimeDtypes, nn.Module):
    """Patches [P, F] of all images and video frames -> merged tokens [P / m^2, D]."""

    config: VisionConfig
    rope_theta: float = DEFAULT_ROPE_THETA
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, pixels_PF: jax.Array, layout: PatchLayout) -> jax.Array:
        c = self.config
        w, m = c.hidden_size, c.spatial_merge_size
        f = c.in_channels * c.temporal_patch_size * c.patch_size**2
        p = pixels_PF.shape[0]
        if pixels_PF.shape[-1] != f or p % (m * m):
            raise ValueError(
                f"pixel values must be [P, {f}] with P a multiple of {m * m}, got {pixels_PF.shape}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_PW = Dense((f,), (w,), (None, "embed"), **kw, name="patch_embed")(pixels_PF)

        side = int(round(c.num_position_embeddings**0.5))
        table_SW = weight(
            self, "pos_embed", (c.num_position_embeddings, w), (None, "embed"), cast=False
        )
        idx_P4, wt_P4 = interpolation_taps(layout, side)
        pos_PW = jnp.einsum("pkw,pk->pw", table_SW.astype(jnp.float32)[idx_P4], wt_P4)
        x_PW = x_PW + pos_PW.astype(x_PW.dtype)

        cos_PH, sin_PH = vision_rotary(layout, w // c.num_heads, self.rope_theta)
        mask_PP = layout.segment_P[:, None] == layout.segment_P[None, :]
        ctx = BlockContext(cos_PH, sin_PH, mask_PP)
        block = VisionBlock
        if self.runtime.remat_policy != "none":
            block = nn.remat(VisionBlock, policy=REMAT_POLICIES[self.runtime.remat_policy])
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=c.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_PW, _ = blocks(c, **kw, name="blocks")(x_PW, ctx)
        return PatchMerger(c, **kw, name="merger")(x_PW)


class PatchMerger(nn.Module):
    """LayerNorm, then each m x m block of patches (consecutive) -> one token of width D."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_PW: jax.Array) -> jax.Array:
        c = self.config
        u = c.hidden_size * c.spatial_merge_size**2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_MU = LayerNorm(param_dtype=self.param_dtype, name="norm")(x_PW).reshape(-1, u)
        x_MU = Dense((u,), (u,), (None, "mlp"), **kw, name="linear_fc1")(x_MU)
        x_MU = jax.nn.gelu(x_MU, approximate=False)
        return Dense((u,), (c.out_hidden_size,), ("mlp", "embed"), **kw, name="linear_fc2")(x_MU)
