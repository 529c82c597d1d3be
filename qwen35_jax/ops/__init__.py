"""Numerical kernels: the chunkwise gated delta rule and its sequence-parallel helpers."""

from qwen35_jax.ops.delta_rule import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
