"""The one table between Hugging Face tensor names and our parameter tree, in both directions.

Each Hugging Face tensor is a `Rule`: its key, its shape, and the `Piece`s of our tree it fills
(a leaf path, a leading index into the stacked leaf, and the two array transforms). Most rules
have one piece; the fused GDN projection `in_proj_qkv` and its `conv1d` split along axis 0 into
q, k, v pieces, and a fused `experts.gate_up_proj` splits into gate and up.

Layer i of the HF model lives in our tree at (interval = full_attention_interval, nb blocks):
    i < nb*interval, i % interval <  interval-1  ->  blocks/linear_layers  (i//interval, i%interval)
    i < nb*interval, i % interval == interval-1  ->  blocks/full_layer     (i//interval,)
    i >= nb*interval                              ->  tail_layers          (i - nb*interval,)
The MTP head's layers are unstacked: mtp/layers_{j}.
"""

from __future__ import annotations

import numpy as np

from qwen35_jax.config import Qwen35Config, TextConfig
from qwen35_jax.convert.pieces import Piece, Rule, conv, linear, linear_rows_first, reshape, same
from qwen35_jax.convert.vision_names import vision_rules

__all__ = ["Piece", "Rule", "hf_rules", "layer_rules"]


def _mlp_rules(prefix, path, index, d, i) -> list[Rule]:
    return [
        Rule(
            f"{prefix}.gate_proj.weight",
            (i, d),
            (linear((*path, "gate_proj"), index, (d, i), (i, d)),),
        ),
        Rule(
            f"{prefix}.up_proj.weight",
            (i, d),
            (linear((*path, "up_proj"), index, (d, i), (i, d)),),
        ),
        Rule(
            f"{prefix}.down_proj.weight",
            (d, i),
            (linear((*path, "down_proj"), index, (i, d), (d, i)),),
        ),
    ]


def layer_rules(
    c: TextConfig,
    prefix: str,
    path: tuple[str, ...],
    index: tuple[int, ...],
    kind: str,
    fused_experts: bool = False,
) -> list[Rule]:
    """Rules for one decoder layer (`prefix` like 'model.layers.5')."""
    d = c.hidden_size
    rules = [
        Rule(
            f"{prefix}.input_layernorm.weight",
            (d,),
            (same((*path, "input_layernorm", "scale"), index),),
        ),
        Rule(
            f"{prefix}.post_attention_layernorm.weight",
            (d,),
            (same((*path, "post_attention_layernorm", "scale"), index),),
        ),
    ]
    if kind == "linear_attention":
        nk, nv, kd, vd, w = (
            c.linear_num_key_heads,
            c.linear_num_value_heads,
            c.linear_key_head_dim,
            c.linear_value_head_dim,
            c.linear_conv_kernel_dim,
        )
        p, pre = (*path, "linear_attn"), f"{prefix}.linear_attn"
        sizes = (nk * kd, nk * kd, nv * vd)
        conv_dim = sum(sizes)
        rules += [
            Rule(
                f"{pre}.in_proj_qkv.weight",
                (conv_dim, d),
                (
                    linear((*p, "in_proj_q"), index, (d, nk, kd), (nk * kd, d)),
                    linear((*p, "in_proj_k"), index, (d, nk, kd), (nk * kd, d)),
                    linear((*p, "in_proj_v"), index, (d, nv, vd), (nv * vd, d)),
                ),
                0,
                sizes,
            ),
            Rule(
                f"{pre}.conv1d.weight",
                (conv_dim, 1, w),
                (
                    conv((*p, "conv_q"), index, (w, nk, kd)),
                    conv((*p, "conv_k"), index, (w, nk, kd)),
                    conv((*p, "conv_v"), index, (w, nv, vd)),
                ),
                0,
                sizes,
            ),
            Rule(
                f"{pre}.in_proj_z.weight",
                (nv * vd, d),
                (linear((*p, "in_proj_z"), index, (d, nv, vd), (nv * vd, d)),),
            ),
            Rule(
                f"{pre}.in_proj_b.weight",
                (nv, d),
                (linear((*p, "in_proj_b"), index, (d, nv), (nv, d)),),
            ),
            Rule(
                f"{pre}.in_proj_a.weight",
                (nv, d),
                (linear((*p, "in_proj_a"), index, (d, nv), (nv, d)),),
            ),
            Rule(f"{pre}.A_log", (nv,), (same((*p, "A_log"), index),)),
            Rule(f"{pre}.dt_bias", (nv,), (same((*p, "dt_bias"), index),)),
            Rule(f"{pre}.norm.weight", (vd,), (same((*p, "norm", "scale"), index),)),
            Rule(
                f"{pre}.out_proj.weight",
                (d, nv * vd),
                (linear_rows_first((*p, "out_proj"), index, (nv, vd, d), (d, nv * vd)),),
            ),
        ]
    else:
        n, g, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        p, pre = (*path, "self_attn"), f"{prefix}.self_attn"
        rules += [
            Rule(
                f"{pre}.q_proj.weight",
                (n * 2 * h, d),
                (linear((*p, "q_proj"), index, (d, n, 2 * h), (n * 2 * h, d)),),
            ),
            Rule(
                f"{pre}.k_proj.weight",
                (g * h, d),
                (linear((*p, "k_proj"), index, (d, g, h), (g * h, d)),),
            ),
            Rule(
                f"{pre}.v_proj.weight",
                (g * h, d),
                (linear((*p, "v_proj"), index, (d, g, h), (g * h, d)),),
            ),
            Rule(
                f"{pre}.o_proj.weight",
                (d, n * h),
                (linear_rows_first((*p, "o_proj"), index, (n, h, d), (d, n * h)),),
            ),
            Rule(f"{pre}.q_norm.weight", (h,), (same((*p, "q_norm", "scale"), index),)),
            Rule(f"{pre}.k_norm.weight", (h,), (same((*p, "k_norm", "scale"), index),)),
        ]
        if c.attention_bias:
            rules += [
                Rule(
                    f"{pre}.q_proj.bias",
                    (n * 2 * h,),
                    (reshape((*p, "q_bias"), index, (n, 2 * h), (n * 2 * h,)),),
                ),
                Rule(
                    f"{pre}.k_proj.bias",
                    (g * h,),
                    (reshape((*p, "k_bias"), index, (g, h), (g * h,)),),
                ),
                Rule(
                    f"{pre}.v_proj.bias",
                    (g * h,),
                    (reshape((*p, "v_bias"), index, (g, h), (g * h,)),),
                ),
                Rule(f"{pre}.o_proj.bias", (d,), (same((*p, "o_bias"), index),)),
            ]
    p, pre = (*path, "mlp"), f"{prefix}.mlp"
    if not c.is_moe:
        return rules + _mlp_rules(pre, p, index, d, c.intermediate_size)
    e, i, s = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
    rules += [
        Rule(f"{pre}.gate.weight", (e, d), (linear((*p, "gate"), index, (d, e), (e, d)),)),
        Rule(
            f"{pre}.shared_expert_gate.weight",
            (1, d),
            (reshape((*p, "shared_expert_gate"), index, (d,), (1, d)),),
        ),
        *_mlp_rules(f"{pre}.shared_expert", (*p, "shared_expert"), index, d, s),
    ]
    ep = (*p, "experts")
    if fused_experts:
        swap = lambda a: np.swapaxes(a, 1, 2)
        rules += [
            Rule(
                f"{pre}.experts.gate_up_proj",
                (e, 2 * i, d),
                (
                    Piece((*ep, "gate_proj"), index, swap, swap),
                    Piece((*ep, "up_proj"), index, swap, swap),
                ),
                1,
                (i, i),
            ),
            Rule(
                f"{pre}.experts.down_proj",
                (e, d, i),
                (Piece((*ep, "down_proj"), index, swap, swap),),
            ),
        ]
    else:
        for x in range(e):
            rules += _mlp_rules(f"{pre}.experts.{x}", ep, (*index, x), d, i)
    return rules


def hf_rules(
    config: Qwen35Config,
    *,
    multimodal_prefix: bool,
    fused_experts: bool = False,
    vision_prefix: str | None = None,
) -> list[Rule]:
    """Every text and MTP tensor of a Hugging Face checkpoint of `config`; with `vision_prefix`
    (e.g. 'model.visual.') and a vision_config, the vision tower's too (`vision_names.py`)."""
    c = config.text_config
    d, v = c.hidden_size, c.vocab_size
    base = "model.language_model" if multimodal_prefix else "model"
    rules = [
        Rule(f"{base}.embed_tokens.weight", (v, d), (same(("embed_tokens",)),)),
        Rule(f"{base}.norm.weight", (d,), (same(("norm", "scale")),)),
    ]
    if not c.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", (v, d), (linear(("lm_head",), (), (d, v), (v, d)),)))
    interval, nb = c.full_attention_interval, c.num_blocks
    for layer, kind in enumerate(c.layer_types):
        if layer < nb * interval:
            b, j = divmod(layer, interval)
            if j < interval - 1:
                path, index = ("blocks", "linear_layers"), (b, j)
            else:
                path, index = ("blocks", "full_layer"), (b,)
        else:
            path, index = ("tail_layers",), (layer - nb * interval,)
        rules += layer_rules(c, f"{base}.layers.{layer}", path, index, kind, fused_experts)
    if c.mtp_num_hidden_layers:
        rules += [
            Rule("mtp.fc.weight", (d, 2 * d), (linear(("mtp", "fc"), (), (2 * d, d), (d, 2 * d)),)),
            Rule("mtp.norm.weight", (d,), (same(("mtp", "norm", "scale")),)),
            Rule(
                "mtp.pre_fc_norm_embedding.weight",
                (d,),
                (same(("mtp", "pre_fc_norm_embedding", "scale")),),
            ),
            Rule(
                "mtp.pre_fc_norm_hidden.weight",
                (d,),
                (same(("mtp", "pre_fc_norm_hidden", "scale")),),
            ),
        ]
        for j in range(c.mtp_num_hidden_layers):
            rules += layer_rules(
                c, f"mtp.layers.{j}", ("mtp", f"layers_{j}"), (), "full_attention", fused_experts
            )
    if vision_prefix is not None and config.vision_config is not None:
        rules += vision_rules(config.vision_config, vision_prefix)
    return rules
