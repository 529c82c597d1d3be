"""Group-relative advantages of the GRPO family (one group = the responses to one prompt).

    group_advantages(rewards_BG, kind) -> A_BG          B prompts, G responses each

    grpo    A = (r - mean_g r) / (std_g r + eps)   std with ddof = 1 (TRL, Tunix)
    drgrpo  A = r - mean_g r                       (Dr. GRPO: no division by the spread)
    rloo    A = r - (sum_g r - r) / (G - 1)        leave-one-out mean (REINFORCE LOO)

A group whose rewards are all equal has A = 0 everywhere: it carries no gradient (DAPO's dynamic
sampling drops such groups and draws more prompts, train/rl/rollout.py).
"""

from __future__ import annotations

import jax.numpy as jnp

KINDS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards_BG, kind: str = "grpo", eps: float = 1e-6) -> jnp.ndarray:
    """Advantages [B, G] of rewards [B, G] (float32); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"advantage kind {kind!r} must be one of {KINDS}")
    r_BG = jnp.asarray(rewards_BG, jnp.float32)
    if r_BG.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {r_BG.shape}")
    g = r_BG.shape[1]
    if g < 2:
        raise ValueError(f"group_size={g}: group advantages need at least 2 responses per prompt")
    mean_B1 = jnp.mean(r_BG, axis=1, keepdims=True)
    if kind == "grpo":
        std_B1 = jnp.std(r_BG, axis=1, keepdims=True, ddof=1)
        return (r_BG - mean_B1) / (std_B1 + eps)
    if kind == "drgrpo":
        return r_BG - mean_B1
    others_B1 = (jnp.sum(r_BG, axis=1, keepdims=True) - r_BG) / (g - 1)
    return r_BG - others_B1
