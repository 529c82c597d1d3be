"""Sampling: top-k / top-p equal transformers' warpers on random logits; sampled tokens follow
the filtered distribution (chi-square tests that also reject a wrong distribution); generate's
first sampled tokens over many rows follow its own filtered prefill logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import qwen35_jax as q
from qwen35_jax import decode
from qwen35_jax.sampling import filtered_logits, sample, top_k_filter, top_p_filter


def random_logits(seed: int, shape=(6, 50)) -> np.ndarray:
    return (2.0 * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


def hf_apply(warpers, logits: np.ndarray) -> np.ndarray:
    return LogitsProcessorList(warpers)(None, torch.tensor(logits)).numpy()


@pytest.mark.parametrize("k", [1, 3, 17, 50, 80])
def test_top_k_equals_transformers(k):
    logits = random_logits(k)
    logits[0, :5] = logits[0, 5]  # ties at the threshold are kept by both
    ours = np.asarray(top_k_filter(jnp.asarray(logits), k))
    np.testing.assert_array_equal(ours, hf_apply([TopKLogitsWarper(k)], logits))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    logits = random_logits(int(p * 1000))
    ours = np.asarray(top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(ours, hf_apply([TopPLogitsWarper(p)], logits))


@pytest.mark.parametrize("temperature, k, p", [(0.7, 10, 0.8), (1.3, 0, 0.6), (0.5, 4, 1.0)])
def test_warper_chain_equals_transformers(temperature, k, p):
    logits = random_logits(11)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(k)] if k else []
    warpers += [TopPLogitsWarper(p)] if p < 1 else []
    ours = np.asarray(filtered_logits(jnp.asarray(logits), temperature, k, p))
    np.testing.assert_allclose(ours, hf_apply(warpers, logits), rtol=1e-6)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the counts under probs (categories of zero probability must have no counts:
    otherwise 0)."""
    if np.any(counts[probs == 0] > 0):
        return 0.0
    keep = probs > 0
    expected = probs[keep].astype(np.float64)
    expected = counts.sum() * expected / expected.sum()
    return float(stats.chisquare(counts[keep].astype(np.float64), expected).pvalue)


def test_sampled_tokens_follow_the_filtered_distribution():
    """20,000 draws of one row; the test rejects the unfiltered and a mis-tempered law."""
    logits_1V = jnp.asarray(0.4 * random_logits(3, (1, 12)))
    temperature, k, p = 0.8, 6, 0.85
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda key: sample(key, logits_1V, temperature, k, p)[0][0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=12)
    probs = np.asarray(jax.nn.softmax(filtered_logits(logits_1V, temperature, k, p))[0])
    assert 3 <= np.count_nonzero(probs) < 6  # both filters cut
    assert chi_square_p(counts, probs) > 1e-3
    unfiltered = np.asarray(jax.nn.softmax(logits_1V / temperature)[0])
    assert chi_square_p(counts, unfiltered) < 1e-6
    hotter = np.asarray(jax.nn.softmax(filtered_logits(logits_1V, 1.2, k, p))[0])
    assert chi_square_p(counts, hotter) < 1e-6


def test_generate_first_tokens_follow_filtered_prefill_logits():
    """256 rows of one prompt: each row draws its own first token."""
    config = q.get_config("tiny")
    params = q.init_params(config, jax.random.key(0))
    prompt = list(np.random.RandomState(0).randint(0, 200, 7))
    temperature, k, p = 1.0, 8, 0.9
    out = q.generate(
        config,
        params,
        [prompt] * 256,
        max_new_tokens=1,
        rng=jax.random.key(3),
        temperature=temperature,
        top_k=k,
        top_p=p,
    )
    logits, _ = decode.prefill(config, params, jnp.asarray([prompt]), jnp.asarray([7]), 8)
    probs = np.asarray(jax.nn.softmax(filtered_logits(logits, temperature, k, p))[0])
    assert np.count_nonzero(probs) >= 3
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=probs.shape[0])
    assert chi_square_p(counts, probs) > 1e-3
    assert len(np.unique(np.asarray(out.tokens))) > 1
    logp = np.asarray(jax.nn.log_softmax(logits / temperature)[0])
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), logp[out.tokens[:, 0]], atol=1e-5)
