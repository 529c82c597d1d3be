"""Training losses on packed rows, computed in float32.

Targets. For a row of tokens with segment ids (0 = padding), position t predicts token t+s
(s = 1 for the main head, s = 2 for the MTP head) only when t, t+1, ..., t+s all belong to t's
document:
    valid_s[t] = seg[t] != 0  and  seg[t+1] == ... == seg[t+s] == seg[t]      (t + s < T)
so the last token of a document (its eos) and the token before a padding run get no main target,
and the MTP head has no target for the last two tokens of a document. Multimodal rows also carry
a `loss_mask` (1 on text tokens, 0 on vision_start / image placeholders / vision_end): a token
with mask 0 is never a target, so the loss is on text only:
    valid_s[t] &= loss_mask[t+s]

    CE      = sum_t valid_1[t] * -log softmax(logits[t])[tok[t+1]] / sum_t valid_1[t]
    z-loss  = z * sum_t valid_1[t] * logsumexp(logits[t])^2 / sum_t valid_1[t]
    MTP     = sum_t valid_2[t] * -log softmax(mtp_logits[t])[tok[t+2]] / sum_t valid_2[t]
    total   = CE + z-loss + mtp_lambda * MTP + router_aux_loss_coef * MoE aux loss

The functions return sums and counts (not means) so that gradient accumulation over
micro-batches can normalise by the token count of the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen35_jax import sharding


def shifted_targets(
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array,
    shift: int,
    loss_mask_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(targets_BT, valid_BT): token t+shift and whether it is a target of position t
    (with `loss_mask_BT`, only tokens whose mask is nonzero are targets)."""
    b, t = tokens_BT.shape
    pad_tok_BS = jnp.zeros((b, shift), tokens_BT.dtype)
    pad_seg_BS = jnp.zeros((b, shift), segment_ids_BT.dtype)
    targets_BT = jnp.concatenate([tokens_BT[:, shift:], pad_tok_BS], axis=1)[:, :t]
    valid_BT = segment_ids_BT != 0
    for s in range(1, shift + 1):
        seg_next_BT = jnp.concatenate([segment_ids_BT[:, s:], pad_seg_BS[:, :s]], axis=1)[:, :t]
        valid_BT = valid_BT & (seg_next_BT == segment_ids_BT)
    if loss_mask_BT is not None:
        pad_BS = jnp.zeros((b, shift), loss_mask_BT.dtype)
        mask_next_BT = jnp.concatenate([loss_mask_BT[:, shift:], pad_BS], axis=1)[:, :t]
        valid_BT = valid_BT & (mask_next_BT != 0)
    return targets_BT, valid_BT


def cross_entropy_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, valid_BT: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE, sum of logsumexp^2, number of targets) over valid positions, float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = valid_BT.astype(jnp.float32)
    ce = jnp.sum((lse_BT - target_logit_BT) * mask_BT)
    z = jnp.sum(jnp.square(lse_BT) * mask_BT)
    return ce, z, jnp.sum(mask_BT)


def chunked_cross_entropy_sums(
    hidden_BTD: jax.Array,
    head_DV: jax.Array,
    targets_BT: jax.Array,
    valid_BT: jax.Array,
    *,
    chunk: int,
    dtype: jnp.dtype = jnp.float32,
    row_groups: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`cross_entropy_sums(hidden @ head, ...)` without ever holding the [B, T, V] logits.

    A scan over chunks of `chunk` positions (T padded to a multiple with invalid positions) and,
    with `row_groups` R > 1, over R groups of rows: group r holds rows r, R + r, 2R + r, ...
    (row b = y * R + r), so when the rows are sharded in contiguous blocks whose size R divides,
    every device keeps computing on its own rows, B / (R * shards) of them per step (the
    trainer passes R = rows per device: one row per device at a time). Each step's logits
    [B / R, chunk, V] (`dtype` operands, float32 accumulation, as the model's own head) are
    rematerialised in the backward pass, so the head costs O(B / R * chunk * V) memory instead
    of O(B * T * V), for one extra head matmul.
    """
    b, t, d = hidden_BTD.shape
    if b % row_groups:
        raise ValueError(f"row_groups={row_groups} does not divide the {b} rows")
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        valid_BT = jnp.pad(valid_BT, ((0, 0), (0, pad)))
    r, y = row_groups, b // row_groups

    def steps(x_BT_):  # [B, T, ...] -> [R * N, B / R, chunk, ...] (scan steps first)
        x_YRNC_ = x_BT_.reshape(y, r, n, chunk, *x_BT_.shape[2:])
        x_RNYC_ = jnp.moveaxis(x_YRNC_, 0, 2)
        return x_RNYC_.reshape(r * n, y, chunk, *x_BT_.shape[2:])

    # gathered over the FSDP axes once per call (vocab stays split over `tensor`): left to the
    # compiler, the D-sharded head was gathered again by every chunk in the forward and twice
    # in the backward (rings of collective-permutes: 735 of the 2b recipe's 767 GiB per step)
    head_DV = sharding.constrain(head_DV.astype(dtype), (None, "vocab"))

    @jax.checkpoint
    def one_chunk(h_YCD, tgt_YC, val_YC):
        logits_YCV = jnp.einsum(
            "bcd,dv->bcv", h_YCD.astype(dtype), head_DV, preferred_element_type=jnp.float32
        )
        return cross_entropy_sums(logits_YCV, tgt_YC, val_YC)

    def body(carry, xs):
        return tuple(a + x for a, x in zip(carry, one_chunk(*xs), strict=True)), None

    zero = jnp.zeros((), jnp.float32)
    xs = (steps(hidden_BTD), steps(targets_BT), steps(valid_BT))
    sums, _ = jax.lax.scan(body, (zero, zero, zero), xs)
    return sums


def target_counts(
    segment_ids_BT: jax.Array, with_mtp: bool, loss_mask_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Number of main-head and MTP targets in a batch (float32 scalars)."""
    _, valid1_BT = shifted_targets(segment_ids_BT, segment_ids_BT, 1, loss_mask_BT)
    n1 = jnp.sum(valid1_BT.astype(jnp.float32))
    if not with_mtp:
        return n1, jnp.zeros((), jnp.float32)
    _, valid2_BT = shifted_targets(segment_ids_BT, segment_ids_BT, 2, loss_mask_BT)
    return n1, jnp.sum(valid2_BT.astype(jnp.float32))
