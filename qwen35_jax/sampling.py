"""Choosing the next token from logits: greedy, temperature, top-k, top-p (transformers' warpers).

In transformers' order (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`):

    z = logits / temperature
    top-k:  z_v = -inf where z_v < (k-th largest z)                    (ties at the k-th kept)
    top-p:  sort z ascending, c = cumsum(softmax(sorted z));
            remove the sorted entries with c <= 1 - p, never the largest  (then unsorted)
    token ~ softmax(filtered z)        (temperature 0: token = argmax logits, nothing filtered)
    logprob = log_softmax(z)[token]    before filtering; temperature 1 when greedy

top_k = 0 and top_p = 1.0 switch the filters off. Each row draws with its own noise from one key
(`jax.random.categorical` over [B, V]), so a key reproduces the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Logits below the k-th largest of their row set to -inf (k <= 0: unchanged)."""
    if k <= 0:
        return logits_BV
    k = min(k, logits_BV.shape[-1])
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: the smallest tokens whose cumulative probability is <= 1 - p set to -inf
    (the most likely token always stays; p >= 1: unchanged)."""
    if p >= 1.0:
        return logits_BV
    order_BV = jnp.argsort(logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_sorted_BV = (cum_BV <= 1.0 - p).at[..., -1].set(False)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    remove_BV = jnp.zeros_like(remove_sorted_BV).at[rows_B1, order_BV].set(remove_sorted_BV)
    return jnp.where(remove_BV, -jnp.inf, logits_BV)


def filtered_logits(
    logits_BV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The logits a sampler draws from: tempered, then top-k, then top-p filtered."""
    z_BV = logits_BV.astype(jnp.float32) / temperature
    return top_p_filter(top_k_filter(z_BV, top_k), top_p)


def sample(
    key: jax.Array,
    logits_BV: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(token_B int32, logprob_B float32) per row; see the module docstring."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0.0:
        token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    else:
        logp_BV = jax.nn.log_softmax(logits_BV / temperature, axis=-1)
        z_BV = filtered_logits(logits_BV, temperature, top_k, top_p)
        token_B = jax.random.categorical(key, z_BV, axis=-1).astype(jnp.int32)
    logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B
