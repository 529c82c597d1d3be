"""train.rl.losses.policy_loss and train.rl.advantages.group_advantages against an independent
numpy implementation of the issue's formulas (float64): values and d loss / d logp, ragged masks,
every algo x aggregation, with and without the k3 KL; presets."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.rl.advantages import group_advantages
from train.rl.losses import ALGOS, LOSS_AGGS, PRESETS, policy_loss


def np_advantages(r, kind, eps=1e-6):
    r = np.asarray(r, np.float64)
    g = r.shape[1]
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        row = r[b]
        mean = row.sum() / g
        if kind == "grpo":
            std = np.sqrt(((row - mean) ** 2).sum() / (g - 1))
            out[b] = (row - mean) / (std + eps)
        elif kind == "drgrpo":
            out[b] = row - mean
        else:
            out[b] = [row[i] - (row.sum() - row[i]) / (g - 1) for i in range(g)]
    return out


def np_weights(mask, agg, max_len):
    """w[b, t] with agg(x) = sum_bt w x (all three aggregations are linear in x)."""
    b, t = mask.shape
    if agg == "token_mean":
        return mask / max(mask.sum(), 1.0)
    if agg == "seq_mean_token_mean":
        return mask / np.maximum(mask.sum(1, keepdims=True), 1.0) / b
    return mask / (b * (t if max_len is None else max_len))


def np_policy_loss(logp, old, adv, mask, algo, lo, hi, ref, beta, agg, max_len):
    """(loss, d loss / d logp) written out token by token."""
    b, t = logp.shape
    w = np_weights(mask, agg, max_len)
    loss, grad = 0.0, np.zeros_like(logp)
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        seq_ratio = np.exp(np.mean([logp[i, j] - old[i, j] for j in valid])) if valid else 1.0
        for j in valid:
            r = seq_ratio if algo == "gspo" else np.exp(logp[i, j] - old[i, j])
            a = adv[i]
            unclipped, clipped = r * a, min(max(r, 1 - lo), 1 + hi) * a
            loss += w[i, j] * -min(unclipped, clipped)
            if unclipped <= clipped:  # the unclipped branch: d(-r a)/d logp_t = -a r
                grad[i, j] += w[i, j] * -a * r
            if ref is not None:
                d = ref[i, j] - logp[i, j]
                loss += beta * w[i, j] * (np.exp(d) - d - 1)
                grad[i, j] += beta * w[i, j] * (1 - np.exp(d))
    return loss, grad


def ragged_mask(rng, b, t):
    mask = np.zeros((b, t))
    for i in range(b):
        start = rng.integers(0, t // 2)
        mask[i, start : start + rng.integers(1, t - start + 1)] = 1
    mask[0, :] = 0  # a prompt-only row: no valid token
    mask[1, 1] = 0 if mask[1].sum() > 2 else mask[1, 1]  # a hole (environment tokens)
    return mask


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_match_numpy(kind):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 4))
    r[2] = 1.0  # an all-equal group: zero advantages
    got = np.asarray(group_advantages(jnp.asarray(r, jnp.float32), kind))
    np.testing.assert_allclose(got, np_advantages(r, kind), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)


def test_group_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="kind"):
        group_advantages(np.zeros((2, 2)), "ppo")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(np.zeros((2, 1)))


CASES = list(itertools.product(ALGOS, LOSS_AGGS, [False, True]))


@pytest.mark.parametrize(("algo", "agg", "with_kl"), CASES)
def test_policy_loss_matches_numpy(algo, agg, with_kl):
    rng = np.random.default_rng(hash((algo, agg, with_kl)) % 2**32)
    b, t = 6, 9
    scale = 3e-4 if algo == "gspo" else 0.3  # both branches of the clip occur
    old = rng.normal(-1.5, 0.5, size=(b, t))
    logp = old + rng.normal(0.0, scale, size=(b, t))
    logp[:, -1] += 5.0  # large differences on some tokens (masked or clipped)
    adv = rng.normal(size=b)
    mask = ragged_mask(rng, b, t)
    ref = old + rng.normal(0, 0.2, size=(b, t)) if with_kl else None
    beta, lo, hi = 0.05, PRESETS[algo]["eps_low"], PRESETS[algo]["eps_high"]
    max_len = 12 if agg == "seq_mean_token_sum_norm" else None
    want_loss, want_grad = np_policy_loss(
        logp, old, adv, mask, algo, lo, hi, ref, beta, agg, max_len
    )

    def f(lp):
        kw = dict(algo=algo, eps_low=lo, eps_high=hi, loss_agg=agg, max_len=max_len)
        if with_kl:
            kw.update(ref_logp_BT=jnp.asarray(ref, jnp.float32), beta=beta)
        return policy_loss(
            lp,
            jnp.asarray(old, jnp.float32),
            jnp.asarray(adv, jnp.float32),
            jnp.asarray(mask),
            **kw,
        )

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(float(loss), want_loss, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6, rtol=1e-5)
    assert float(metrics.tokens) == mask.sum()
    assert (
        0.0 <= float(metrics.clip_frac_low) <= 1.0 and 0.0 <= float(metrics.clip_frac_high) <= 1.0
    )
    if with_kl:
        assert float(metrics.kl) > 0.0


def test_clip_fractions_count_the_clipped_branch():
    logp = jnp.log(jnp.asarray([[1.5, 1.0, 0.5, 1.0]]))  # ratios 1.5, 1, 0.5, 1 vs old 0
    old = jnp.zeros((1, 4))
    mask = jnp.ones((1, 4))
    _, m = policy_loss(logp, old, jnp.asarray([1.0]), mask)
    assert float(m.clip_frac_high) == 0.25 and float(m.clip_frac_low) == 0.0
    _, m = policy_loss(logp, old, jnp.asarray([-1.0]), mask)
    assert float(m.clip_frac_low) == 0.25 and float(m.clip_frac_high) == 0.0
    np.testing.assert_allclose(float(m.ratio_mean), 1.0, atol=1e-6)


def test_presets():
    assert (PRESETS["dapo"]["eps_low"], PRESETS["dapo"]["eps_high"]) == (0.2, 0.28)
    assert PRESETS["dapo"]["loss_agg"] == "token_mean" and PRESETS["dapo"]["dynamic_sampling"]
    assert PRESETS["grpo"]["loss_agg"] == "seq_mean_token_mean"
    assert (PRESETS["gspo"]["eps_low"], PRESETS["gspo"]["eps_high"]) == (3e-4, 4e-4)
