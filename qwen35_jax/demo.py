"""A short tour: build a tiny random Qwen3.5, run it, and count the eight presets.

    python -m qwen35_jax.demo      # ~22 s of CPU time (was ~27 s): init and forward compile
                                   # (~7 s + ~4 s), tracing the eight presets (~9 s)

Prints the logits of the tiny hybrid model (3 Gated DeltaNet layers + 1 attention layer per
block) for a short prompt, then the parameter count of every released preset, computed with
`jax.eval_shape` (no memory, no FLOPs): text, vision tower, MTP head, and the parameters active
per token (text; for the MoE models only the selected experts count).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import qwen35_jax as q


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def active_count(config: q.Qwen35Config, text_params) -> int:
    """Parameters touched per token: all but the non-selected routed experts (and MTP)."""
    total = count(text_params)
    c = config.text_config
    if not c.is_moe:
        return total
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return total - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert


def preset_table() -> str:
    rows = [f"{'preset':<20}{'text':>10}{'vision':>10}{'MTP':>9}{'total':>10}{'active':>10}"]
    for name in q.PRESETS:
        if name.startswith("tiny"):
            continue
        config = q.get_config(name)
        shapes = nn.meta.unbox(q.abstract_params(config))
        mtp = count(shapes.pop("mtp", {}))
        vision = count(shapes.pop("visual", {}))
        text = count(shapes)
        rows.append(
            f"{name:<20}{text / 1e9:>9.2f}B{vision / 1e9:>9.2f}B{mtp / 1e9:>8.2f}B"
            f"{(text + vision) / 1e9:>9.2f}B{active_count(config, shapes) / 1e9:>9.2f}B"
        )
    return "\n".join(rows)


def main() -> None:
    config = q.get_config("tiny")
    # an "rbg" key: XLA's RngBitGenerator; the init then compiles several times faster than
    # with the default threefry key, whose compile was most of this tour's time
    params = q.init_params(config, jax.random.key(0, impl="rbg"))
    ids = jnp.asarray(np.arange(1, 13, dtype=np.int32)[None])
    logits = jax.jit(q.forward, static_argnums=0)(config, params, ids)
    c = config.text_config
    print(
        f"tiny Qwen3.5: {c.num_hidden_layers} layers ({c.layer_types.count('linear_attention')} "
        f"Gated DeltaNet, {c.layer_types.count('full_attention')} attention), D={c.hidden_size}, "
        f"{count(params):,} parameters"
    )
    print(f"logits {tuple(logits.shape)} {logits.dtype}; last position, first 6 entries:")
    print(np.array2string(np.asarray(logits[0, -1, :6]), precision=4))
    print(f"greedy next tokens: {np.asarray(jnp.argmax(logits[0], -1)).tolist()}")
    print()
    print("released presets (jax.eval_shape; 'total' = text + vision, without the MTP head;")
    print("'active' = text parameters used per token):")
    print(preset_table())


if __name__ == "__main__":
    main()
