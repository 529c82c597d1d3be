"""The outputs both decoding loops fill (plain `generate` and `speculative.py`), in one place.

Emitted(tokens_BN, logprobs_BN, done_B, count_B)
    tokens_BN    int32 [B, N]   the pad id until written; stays the pad id after a stop
    logprobs_BN  float32 [B, N] 0 until written and after a stop
    done_B       bool [B]       the row has emitted a stop id
    count_B      int32 [B]      tokens the row has emitted, its stop id included
emit_column(out, i, tok_B, lp_B, ...)   token i of every row (a done row writes the pad id)
is_stop(tokens, stop_token_ids)         elementwise: the token is one of the stop ids
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Emitted(NamedTuple):
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    done_B: jax.Array
    count_B: jax.Array


def empty(b: int, n: int, pad: int) -> Emitted:
    """Nothing emitted yet: B rows of N pad ids."""
    return Emitted(
        jnp.full((b, n), pad, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )


def is_stop(tokens: jax.Array, stop_token_ids: tuple[int, ...]) -> jax.Array:
    """Boolean, tokens' shape: the token is one of stop_token_ids (none when empty)."""
    stops = jnp.asarray(stop_token_ids or (-1,), jnp.int32)
    return jnp.any(tokens[..., None] == stops.reshape((1,) * tokens.ndim + (-1,)), axis=-1)


def emit_column(
    out: Emitted,
    i: jax.Array | int,
    tok_B: jax.Array,
    lp_B: jax.Array,
    pad: int,
    stop_token_ids: tuple[int, ...],
) -> tuple[Emitted, jax.Array]:
    """(out with token i of every row written, the tokens written [B]): rows already done
    write the pad id and log-prob 0 and do not count; a stop id ends its row."""
    tok_B = jnp.where(out.done_B, pad, tok_B)
    lp_B = jnp.where(out.done_B, 0.0, lp_B)
    count_B = out.count_B + (~out.done_B).astype(jnp.int32)
    done_B = out.done_B | is_stop(tok_B, stop_token_ids)
    tokens_BN = lax.dynamic_update_slice(out.tokens_BN, tok_B[:, None], (0, i))
    logprobs_BN = lax.dynamic_update_slice(out.logprobs_BN, lp_B[:, None], (0, i))
    return Emitted(tokens_BN, logprobs_BN, done_B, count_B), tok_B
