"""The clipped policy-gradient loss of GRPO, DAPO and GSPO, with a k3 KL term: pure functions.

    policy_loss(logp_BT, old_logp_BT, advantages_B, mask_BT, *, algo, eps_low, eps_high,
                ref_logp_BT=None, beta=0.0, loss_agg, max_len=None) -> (loss, PolicyMetrics)

Per token t of sequence b (mask 1: a token the policy generated):
    grpo, dapo   r_t = exp(logp_t - old_logp_t)
    gspo         s_b = exp(mean_t (logp_t - old_logp_t))       (length-normalised, per sequence)
                 r_t = sg(s_b) * exp(logp_t - sg(logp_t))      (value s_b, gradient per token)
    l_t = -min(r_t A_b, clip(r_t, 1 - eps_low, 1 + eps_high) A_b)
    KL (beta > 0, k3 estimator): k_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss = agg(l) + beta * agg(k)

Aggregations agg(x) over the valid tokens:
    token_mean                sum_bt m x / sum_bt m                          (DAPO)
    seq_mean_token_mean       mean_b (sum_t m x / max(sum_t m, 1))          (GRPO, GSPO)
    seq_mean_token_sum_norm   sum_bt m x / (B * max_len), max_len = T by default  (Dr. GRPO)

The metrics are token means over the valid tokens: the clipped fractions (low: A < 0 and
r < 1 - eps_low; high: A > 0 and r > 1 + eps_high, where the clipped branch is the one taken),
the mean and max ratio, the KL (aggregated like the loss; 0 without a reference).

PRESETS hold the published settings of each algorithm (every field can be overridden).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ALGOS = ("grpo", "dapo", "gspo")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# algo -> the defaults of its rl.* fields (train/rl/config.py resolves them)
PRESETS: dict[str, dict] = {
    "grpo": dict(
        eps_low=0.2,
        eps_high=0.2,
        loss_agg="seq_mean_token_mean",
        advantage="grpo",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
    "dapo": dict(
        eps_low=0.2,
        eps_high=0.28,  # clip-higher
        loss_agg="token_mean",
        advantage="grpo",
        dynamic_sampling=True,
        overlong_shaping=True,
    ),
    "gspo": dict(
        eps_low=3e-4,
        eps_high=4e-4,
        loss_agg="seq_mean_token_mean",
        advantage="grpo",
        dynamic_sampling=False,
        overlong_shaping=False,
    ),
}


class PolicyMetrics(NamedTuple):
    pg_loss: jax.Array  # the clipped policy term, aggregated
    kl: jax.Array  # the k3 KL, aggregated like the loss (0 without a reference)
    clip_frac_low: jax.Array
    clip_frac_high: jax.Array
    ratio_mean: jax.Array
    ratio_max: jax.Array
    tokens: jax.Array  # valid tokens


def aggregate(x_BT: jax.Array, mask_BT: jax.Array, loss_agg: str, max_len: int | None = None):
    """agg(x) of the module docstring."""
    m_BT = mask_BT.astype(jnp.float32)
    if loss_agg == "token_mean":
        return jnp.sum(x_BT * m_BT) / jnp.maximum(jnp.sum(m_BT), 1.0)
    if loss_agg == "seq_mean_token_mean":
        per_seq_B = jnp.sum(x_BT * m_BT, axis=1) / jnp.maximum(jnp.sum(m_BT, axis=1), 1.0)
        return jnp.mean(per_seq_B)
    if loss_agg == "seq_mean_token_sum_norm":
        length = x_BT.shape[1] if max_len is None else max_len
        return jnp.sum(x_BT * m_BT) / (x_BT.shape[0] * length)
    raise ValueError(f"loss_agg={loss_agg!r} must be one of {LOSS_AGGS}")


def policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    *,
    algo: str = "grpo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp_BT: jax.Array | None = None,
    beta: float = 0.0,
    loss_agg: str = "seq_mean_token_mean",
    max_len: int | None = None,
) -> tuple[jax.Array, PolicyMetrics]:
    """(loss, metrics) of the module docstring; differentiable with respect to `logp_BT`."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} must be one of {ALGOS}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r} must be one of {LOSS_AGGS}")
    logp_BT = logp_BT.astype(jnp.float32)
    old_BT = jax.lax.stop_gradient(old_logp_BT.astype(jnp.float32))
    m_BT = mask_BT.astype(jnp.float32)
    a_B1 = jax.lax.stop_gradient(jnp.asarray(advantages_B, jnp.float32))[:, None]
    delta_BT = (logp_BT - old_BT) * m_BT  # 0 on masked tokens: no overflow there
    if algo == "gspo":
        seq_B1 = jnp.sum(delta_BT, axis=1, keepdims=True) / jnp.maximum(
            jnp.sum(m_BT, axis=1, keepdims=True), 1.0
        )
        s_B1 = jax.lax.stop_gradient(jnp.exp(seq_B1))
        ratio_BT = s_B1 * jnp.exp(logp_BT - jax.lax.stop_gradient(logp_BT))
    else:
        ratio_BT = jnp.exp(delta_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high)
    per_token_BT = -jnp.minimum(ratio_BT * a_B1, clipped_BT * a_B1)
    pg = aggregate(per_token_BT, m_BT, loss_agg, max_len)
    kl = jnp.zeros((), jnp.float32)
    if ref_logp_BT is not None:
        d_BT = (jax.lax.stop_gradient(ref_logp_BT.astype(jnp.float32)) - logp_BT) * m_BT
        kl = aggregate(jnp.exp(d_BT) - d_BT - 1.0, m_BT, loss_agg, max_len)
    loss = pg + beta * kl if ref_logp_BT is not None else pg
    r_BT = jax.lax.stop_gradient(ratio_BT)
    low_BT = (a_B1 < 0) & (r_BT < 1.0 - eps_low)
    high_BT = (a_B1 > 0) & (r_BT > 1.0 + eps_high)
    tokens = jnp.sum(m_BT)

    def frac(x_BT):
        return jnp.sum(x_BT * m_BT) / jnp.maximum(tokens, 1.0)

    metrics = PolicyMetrics(
        pg_loss=pg,
        kl=jax.lax.stop_gradient(kl),
        clip_frac_low=frac(low_BT.astype(jnp.float32)),
        clip_frac_high=frac(high_BT.astype(jnp.float32)),
        ratio_mean=frac(r_BT),
        ratio_max=jnp.max(jnp.where(m_BT > 0, r_BT, 0.0)),
        tokens=tokens,
    )
    return loss, metrics
