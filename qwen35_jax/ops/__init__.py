"""Numerical kernels: the chunkwise gated delta rule, its sequence-parallel form, and blocked
softmax attention."""

from qwen35_jax.ops.attention import blocked_attention
from qwen35_jax.ops.delta_rule import (
    apply_affine_map,
    chunk_affine_maps,
    compose_affine_maps,
    gated_delta_rule,
    gated_delta_rule_step,
)
from qwen35_jax.ops.sequence_parallel import (
    local_gated_delta_rule,
    previous_tokens,
    sequence_axis_size,
    sequence_parallel_gated_delta_rule,
)

__all__ = [
    "apply_affine_map",
    "blocked_attention",
    "chunk_affine_maps",
    "compose_affine_maps",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "local_gated_delta_rule",
    "previous_tokens",
    "sequence_axis_size",
    "sequence_parallel_gated_delta_rule",
]
