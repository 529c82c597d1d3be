"""Numerical kernels: the chunkwise gated delta rule and its sequence-parallel helpers."""

from qwen35_jax.ops.delta_rule import (
    apply_affine_map,
    chunk_affine_maps,
    compose_affine_maps,
    gated_delta_rule,
    gated_delta_rule_step,
)

__all__ = [
    "apply_affine_map",
    "chunk_affine_maps",
    "compose_affine_maps",
    "gated_delta_rule",
    "gated_delta_rule_step",
]
