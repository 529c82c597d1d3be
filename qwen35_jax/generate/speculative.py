"""MTP speculative decoding: the MTP head drafts k tokens, the model verifies them in one pass.

    generate(..., num_draft_tokens=k)   (k >= 1; `generate/__init__.py` calls `speculative_arrays`)

Per row the loop keeps: the decode state (`decode_state.py`) of the L tokens the model has
read, the last emitted token x_L (not yet read), and the MTP head's own key/value caches, whose
slot p holds the MTP layer's input pair (h_p, x_{p+1}) for p < L (h_p: the model's final-normed
hidden state at p). One iteration (all rows together, inside one `lax.while_loop`):

1. Draft (`mtp.py`, as vLLM's qwen3_next_mtp drafts with one MTP layer): d_1 came from the last
   MTP call (pair (h_{L-1}, x_L) at slot L-1); for j = 2..k the head runs on its own output:
   pair (o_{j-1}, d_{j-1}) at slot L+j-2, d_j = argmax of the shared LM head on o_j.
2. Verify: `decode.decode_step` over [x_L, d_1, ..., d_k] (T = k+1) at slots L..L+k, with
   `every_position=True`: each Gated DeltaNet layer returns its state after every position and
   its conv inputs, so the state after the last accepted position is selected, not recomputed
   (`decode.keep_positions`); the attention caches are cut back by length (slots >= L are
   never read, later overwritten).
3. Accept, per row: n = the number of leading drafts accepted; the row emits d_1..d_n and one
   more token y from the model's distribution at position n (a correction or, n = k, a bonus):
     greedy    d_j accepted while d_j = argmax p_{j-1}; y = argmax p_n. The output equals plain
               greedy decoding token for token (the same argmax chain).
     sampling  p_j = softmax of the filtered logits (temperature, top-k, top-p, as `sampling.py`)
               at verified position j. d_j accepted with probability p_{j-1}(d_j) (u < p(d));
               on the first rejection y ~ p_n with d_{n+1} removed and renormalised; n = k:
               y ~ p_k. The drafter is treated as a point mass on its argmax: the drafts are a
               deterministic function of the past, so q = delta(d) and the standard rule
               (accept min(1, p/q), resample from max(0, p - q)) reduces to the above. For any
               d chosen independently of the verifier's noise, P(token = x) = P(d = x) p(x) +
               sum_{d != x} P(d) (1 - p(d)) p(x) / (1 - p(d)) = p(x): the output distribution is
               exactly the model's. (Sampling the drafts from q and using q's probabilities
               would also be exact; argmax drafts are what vLLM's MTP proposer sends.)
   Stop ids and max_new_tokens cut a row's emitted tokens exactly where plain decoding would.
4. Catch up the MTP head: the pairs (h_{L+j}, e_j) of the T verified positions (e: the emitted
   tokens [d_1..d_n, y, ...]) at slots L..L+k, one call; its output at position n drafts the
   next iteration's d_1. Pairs after n are stale and masked (slot >= the new length).

Outputs as plain `generate`, plus num_accepted [B] (drafts accepted) and num_drafted [B]
(drafts proposed while the row was running). Log-probs as plain decoding (before filtering).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qwen35_jax.config import Qwen35Config
from qwen35_jax.decode import (
    decode_context,
    decode_step,
    head_logits,
    keep_positions,
    pad_slots,
    prefill,
    prefill_context,
    write_kv,
)
from qwen35_jax.generate.outputs import emit_column, empty, is_stop
from qwen35_jax.mtp import MTPHead
from qwen35_jax.runtime import Runtime, resolve
from qwen35_jax.sampling import filtered_logits, sample

RULES = ("exact", "biased")  # "biased": resample from p, not the residual (tests show it fails)


def _mtp(rt, config, params, h_BTD, next_ids_BT, ctx, caches, prefill_mode: bool, logits=True):
    """The MTP head over T pairs: (out_BTD, logits_BTV or None, new-token KVCaches per
    layer)."""
    c = config.text_config
    e_BTD = jnp.take(params["embed_tokens"], next_ids_BT, axis=0).astype(rt.dtype)
    out_BTD, _, new = MTPHead(c, rt).apply(
        {"params": params["mtp"]}, h_BTD, e_BTD, ctx, caches, return_cache=prefill_mode
    )
    return out_BTD, head_logits(rt, config, params, out_BTD) if logits else None, new


def _draft(rt, config, params, o_BD) -> jax.Array:
    """The draft token of each row: argmax of the shared LM head on the MTP output o_BD."""
    return jnp.argmax(head_logits(rt, config, params, o_BD[:, None])[:, 0], axis=-1).astype(
        jnp.int32
    )


def _write(caches: tuple, new: tuple, index_BT) -> tuple:
    """Each MTP layer's cache [B, G, S, H] with the new tokens' keys/values at index_BT."""
    return tuple(write_kv(cache, kv, index_BT) for cache, kv in zip(caches, new, strict=True))


def _at(x_BT, idx_B):
    """x_BT[b, idx_B[b]] (any trailing axes)."""
    idx = idx_B.reshape((-1, 1) + (1,) * (x_BT.ndim - 2))
    return jnp.take_along_axis(x_BT, idx, axis=1)[:, 0]


def accept(key, logits_BTV, drafts_BK, temperature, top_k, top_p, rule="exact"):
    """The acceptance rule (module docstring, step 3) on verified logits [B, k+1, V] and drafts
    [B, k]: (n_B accepted drafts, emitted tokens [B, k+1] = drafts with y at n, their log-probs
    [B, k+1])."""
    b, t, v = logits_BTV.shape
    k = t - 1
    logits_BTV = logits_BTV.astype(jnp.float32)
    if temperature == 0.0:
        target_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
        ok_BK = drafts_BK == target_BT[:, :k]
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    else:
        logp_BTV = jax.nn.log_softmax(logits_BTV / temperature, axis=-1)
        z_BTV = filtered_logits(logits_BTV.reshape(b * t, v), temperature, top_k, top_p).reshape(
            b, t, v
        )
        p_BKV = jax.nn.softmax(z_BTV[:, :k], axis=-1)
        p_draft_BK = jnp.take_along_axis(p_BKV, drafts_BK[..., None], axis=-1)[..., 0]
        k_u, k_y = jax.random.split(key)
        ok_BK = jax.random.uniform(k_u, (b, k)) < p_draft_BK
        if rule == "exact":  # the residual max(0, p - delta(d)): p without the draft
            hit_BKV = jnp.arange(v)[None, None, :] == drafts_BK[..., None]
            z_BTV = z_BTV.at[:, :k].set(jnp.where(hit_BKV, -jnp.inf, z_BTV[:, :k]))
        elif rule != "biased":
            raise ValueError(f"rule={rule!r}: expected one of {RULES}")
        target_BT = jax.random.categorical(k_y, z_BTV, axis=-1).astype(jnp.int32)
    n_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    pos_T = jnp.arange(t)[None, :]
    drafts_BT = jnp.concatenate([drafts_BK, drafts_BK[:, :1]], axis=1)
    emitted_BT = jnp.where(pos_T == n_B[:, None], _at(target_BT, n_B)[:, None], drafts_BT)
    logprob_BT = jnp.take_along_axis(logp_BTV, emitted_BT[..., None], axis=-1)[..., 0]
    return n_B, emitted_BT, logprob_BT


def speculative_loop(
    params,
    ids_BT,
    lengths_B,
    rng,
    positions,
    vision,
    *,
    config: Qwen35Config,
    slots: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_token_ids: tuple[int, ...],
    num_draft_tokens: int,
    pad: int,
    runtime: Runtime | None = None,
) -> tuple[jax.Array, ...]:
    """(tokens [B, N], lengths [B], logprobs [B, N], num_accepted [B], num_drafted [B]), traced
    inside `generate_arrays`: prompts right-padded to a bucket, `slots` >= bucket + N + k."""
    rt = resolve(runtime)
    k, n = num_draft_tokens, max_new_tokens
    b, t = ids_BT.shape
    logits_BV, state, h_BTD = prefill(
        config,
        params,
        ids_BT,
        lengths_B,
        slots,
        positions=positions,
        vision=vision,
        runtime=rt,
        return_hidden=True,
    )
    tok_B, lp_B = sample(jax.random.fold_in(rng, 0), logits_BV, temperature, top_k, top_p)
    first, _ = emit_column(empty(b, n, pad), 0, tok_B, lp_B, pad, stop_token_ids)
    # MTP prefill: slot p holds (h_p, x_{p+1}), x_L = the first emitted token
    last_B = lengths_B - 1
    next_BT = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, :1]], axis=1)
    next_BT = jnp.where(jnp.arange(t)[None, :] == last_B[:, None], tok_B[:, None], next_BT)
    ctx, _ = prefill_context(config, lengths_B, t, positions)
    out_BTD, _, new = _mtp(rt, config, params, h_BTD, next_BT, ctx, None, True, False)
    mtp = tuple(pad_slots(kv, slots) for kv in new)
    o_BD = _at(out_BTD, last_B)
    draft_B = _draft(rt, config, params, o_BD)

    tokens_BN, logprobs_BN, done_B, count_B = first
    done_B = done_B | (n <= 1)
    zeros_B = jnp.zeros((b,), jnp.int32)
    rows_B1 = jnp.arange(b)[:, None]

    def cond(c):
        return ~jnp.all(c["done"])

    def body(c):
        state, mtp, length_B = c["state"], c["mtp"], c["state"].length_B
        # 1. drafts d_2..d_k, the MTP head on its own output
        drafts, o_BD, mtp_w = [c["draft"]], c["o"], mtp
        for j in range(1, k):
            mctx, idx_B1 = decode_context(config, length_B + j - 1, state.rope_delta_B, 1, slots)
            out_B1D, _, new = _mtp(
                rt, config, params, o_BD[:, None], drafts[-1][:, None], mctx, mtp_w, False, False
            )
            mtp_w = _write(mtp_w, new, idx_B1)
            o_BD = out_B1D[:, 0]
            drafts.append(_draft(rt, config, params, o_BD))
        drafts_BK = jnp.stack(drafts, axis=1)
        # 2. verify x_L, d_1..d_k in one pass, GDN states kept at every position
        ids_BT = jnp.concatenate([c["last"][:, None], drafts_BK], axis=1)
        logits_BTV, every, hid_BTD = decode_step(
            config, params, state, ids_BT, runtime=rt, every_position=True, return_hidden=True
        )
        # 3. accept
        key = jax.random.fold_in(rng, c["i"])
        n_B, emit_BT, lp_BT = accept(key, logits_BTV, drafts_BK, temperature, top_k, top_p)
        m_B = n_B + 1  # tokens this row emits, before stops and the budget
        pos_T = jnp.arange(k + 1)[None, :]
        stop_BT = is_stop(emit_BT, stop_token_ids) & (pos_T < m_B[:, None])
        first_stop_B = jnp.where(jnp.any(stop_BT, axis=1), jnp.argmax(stop_BT, axis=1) + 1, m_B)
        cut_B = jnp.minimum(jnp.minimum(m_B, first_stop_B), n - c["count"])
        cut_B = jnp.where(c["done"], 0, cut_B)
        keep_BT = pos_T < cut_B[:, None]
        at_BT = c["count"][:, None] + pos_T
        at_BT = jnp.where(keep_BT, at_BT, n)  # dropped
        tokens_BN = c["tokens"].at[rows_B1, at_BT].set(emit_BT, mode="drop")
        logprobs_BN = c["logprobs"].at[rows_B1, at_BT].set(lp_BT, mode="drop")
        count_B = c["count"] + cut_B
        done_B = c["done"] | jnp.any(stop_BT & keep_BT, axis=1) | (count_B >= n)
        running_B = (~c["done"]).astype(jnp.int32)
        # 4. commit the verified prefix; the MTP head catches up on the T verified pairs
        state = keep_positions(every, m_B, k + 1)
        mctx, idx_BT = decode_context(config, length_B, state.rope_delta_B, k + 1, slots)
        out_BTD, _, new = _mtp(rt, config, params, hid_BTD, emit_BT, mctx, mtp, False, False)
        mtp = _write(mtp, new, idx_BT)
        o_BD = _at(out_BTD, n_B)  # only position n drafts: the head runs on one row each
        return dict(
            i=c["i"] + 1,
            state=state,
            mtp=mtp,
            last=_at(emit_BT, n_B),
            draft=_draft(rt, config, params, o_BD),
            o=o_BD,
            tokens=tokens_BN,
            logprobs=logprobs_BN,
            done=done_B,
            count=count_B,
            accepted=c["accepted"] + running_B * jnp.minimum(n_B, cut_B),
            drafted=c["drafted"] + running_B * k,
        )

    init = dict(
        i=jnp.asarray(1, jnp.int32),
        state=state,
        mtp=mtp,
        last=tok_B,
        draft=draft_B,
        o=o_BD,
        tokens=tokens_BN,
        logprobs=logprobs_BN,
        done=done_B,
        count=count_B,
        accepted=zeros_B,
        drafted=zeros_B,
    )
    c = lax.while_loop(cond, body, init)
    return c["tokens"], c["count"], c["logprobs"], c["accepted"], c["drafted"]
