"""Hugging Face `model.visual.*` tensors <-> our `visual/...` subtree (see `vision.py`).

    HF key (after `model.visual.`)     HF shape            ours (under `visual/`; [i] = block index)
    patch_embed.proj.weight            [W, C, Tp, ps, ps]  patch_embed/kernel [F, W]
    patch_embed.proj.bias              [W]                 patch_embed/bias
    pos_embed.weight                   [S^2, W]            pos_embed
    blocks.{i}.norm{1,2}.weight, bias  [W]                 blocks/norm{1,2}/scale, bias [i]
    blocks.{i}.attn.qkv.weight         [3W, W]             blocks/attn/qkv/kernel [i] [W, 3, N, H]
    blocks.{i}.attn.qkv.bias           [3W]                blocks/attn/qkv/bias [i] [3, N, H]
    blocks.{i}.attn.proj.weight        [W, W]              blocks/attn/proj/kernel [i] [N, H, W]
    blocks.{i}.attn.proj.bias          [W]                 blocks/attn/proj/bias [i]
    blocks.{i}.mlp.linear_fc1.*        [I, W], [I]         blocks/linear_fc1/kernel, bias [i]
    blocks.{i}.mlp.linear_fc2.*        [W, I], [W]         blocks/linear_fc2/kernel, bias [i]
    merger.norm.weight, bias           [W]                 merger/norm/scale, bias
    merger.linear_fc1.*                [m^2W, m^2W]        merger/linear_fc1/kernel, bias
    merger.linear_fc2.*                [D, m^2W], [D]      merger/linear_fc2/kernel, bias
Linear weights are transposed (HF [out, in] -> ours [in, out...]); the Conv3d weight, whose
stride equals its kernel, is the linear map of a flattened (C, Tp, ps, ps) patch.
"""

from __future__ import annotations

from qwen35_jax.config import VisionConfig
from qwen35_jax.convert.pieces import Piece, Rule, linear, linear_rows_first, reshape, same

PREFIXES = ("model.visual.", "visual.")


def detect_prefix(keys: list[str]) -> str:
    """The vision key prefix used by a checkpoint (`model.visual.` unless only `visual.`)."""
    if not any(k.startswith("model.visual.") for k in keys) and any(
        k.startswith("visual.") for k in keys
    ):
        return "visual."
    return "model.visual."


def _dense(
    key: str, path: tuple[str, ...], index: tuple[int, ...], fan_in: int, out_shape: tuple[int, ...]
) -> list[Rule]:
    n_out = 1
    for s in out_shape:
        n_out *= s
    return [
        Rule(
            f"{key}.weight",
            (n_out, fan_in),
            (linear((*path, "kernel"), index, (fan_in, *out_shape), (n_out, fan_in)),),
        ),
        Rule(f"{key}.bias", (n_out,), (reshape((*path, "bias"), index, out_shape, (n_out,)),)),
    ]


def _norm(key: str, path: tuple[str, ...], index: tuple[int, ...], w: int) -> list[Rule]:
    return [
        Rule(f"{key}.weight", (w,), (same((*path, "scale"), index),)),
        Rule(f"{key}.bias", (w,), (same((*path, "bias"), index),)),
    ]


def vision_rules(v: VisionConfig, prefix: str = "model.visual.") -> list[Rule]:
    """Every tensor of the vision tower and merger."""
    w, n, i, m2 = v.hidden_size, v.num_heads, v.intermediate_size, v.spatial_merge_size**2
    h = w // n
    c, tp, ps = v.in_channels, v.temporal_patch_size, v.patch_size
    f = c * tp * ps * ps
    root = ("visual",)
    conv_shape = (w, c, tp, ps, ps)
    rules = [
        Rule(
            f"{prefix}patch_embed.proj.weight",
            conv_shape,
            (
                Piece(
                    (*root, "patch_embed", "kernel"),
                    (),
                    lambda a: a.reshape(w, f).T,
                    lambda a: a.T.reshape(conv_shape),
                ),
            ),
        ),
        Rule(f"{prefix}patch_embed.proj.bias", (w,), (same((*root, "patch_embed", "bias")),)),
        Rule(
            f"{prefix}pos_embed.weight",
            (v.num_position_embeddings, w),
            (same((*root, "pos_embed")),),
        ),
    ]
    blocks = (*root, "blocks")
    for b in range(v.depth):
        key, idx = f"{prefix}blocks.{b}", (b,)
        rules += _norm(f"{key}.norm1", (*blocks, "norm1"), idx, w)
        rules += _norm(f"{key}.norm2", (*blocks, "norm2"), idx, w)
        rules += _dense(f"{key}.attn.qkv", (*blocks, "attn", "qkv"), idx, w, (3, n, h))
        rules += [
            Rule(
                f"{key}.attn.proj.weight",
                (w, w),
                (linear_rows_first((*blocks, "attn", "proj", "kernel"), idx, (n, h, w), (w, w)),),
            ),
            Rule(f"{key}.attn.proj.bias", (w,), (same((*blocks, "attn", "proj", "bias"), idx),)),
        ]
        rules += _dense(f"{key}.mlp.linear_fc1", (*blocks, "linear_fc1"), idx, w, (i,))
        rules += _dense(f"{key}.mlp.linear_fc2", (*blocks, "linear_fc2"), idx, i, (w,))
    merger = (*root, "merger")
    rules += _norm(f"{prefix}merger.norm", (*merger, "norm"), (), w)
    rules += _dense(f"{prefix}merger.linear_fc1", (*merger, "linear_fc1"), (), m2 * w, (m2 * w,))
    rules += _dense(
        f"{prefix}merger.linear_fc2", (*merger, "linear_fc2"), (), m2 * w, (v.out_hidden_size,)
    )
    return rules
