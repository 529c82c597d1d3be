"""Loss masking on packed rows, MTP target alignment, z-loss, and the step's loss assembly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax
from train import losses
from train.step import micro_losses

# two documents and a padding tail:   seg 1 1 1 2 2 2 2 0
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
TOK = np.array([[10, 11, 12, 20, 21, 22, 23, 0]], np.int32)


def test_next_token_targets_stay_inside_documents():
    targets, valid = losses.shifted_targets(jnp.asarray(TOK), jnp.asarray(SEG), 1)
    np.testing.assert_array_equal(targets[0, :7], TOK[0, 1:])
    # position 2 (last of doc 1) would predict doc 2's first token; 6 would predict padding
    np.testing.assert_array_equal(valid[0], [1, 1, 0, 1, 1, 1, 0, 0])


def test_mtp_targets_are_two_ahead_inside_documents():
    targets, valid = losses.shifted_targets(jnp.asarray(TOK), jnp.asarray(SEG), 2)
    np.testing.assert_array_equal(targets[0, :6], TOK[0, 2:])
    np.testing.assert_array_equal(valid[0], [1, 0, 0, 1, 1, 0, 0, 0])
    n1, n2 = losses.target_counts(jnp.asarray(SEG), with_mtp=True)
    assert (float(n1), float(n2)) == (5.0, 3.0)


def test_cross_entropy_sums_match_numpy_and_ignore_masked_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 8, 30)).astype(np.float32)
    targets, valid = losses.shifted_targets(jnp.asarray(TOK % 30), jnp.asarray(SEG), 1)
    ce, z, n = losses.cross_entropy_sums(jnp.asarray(logits), targets, valid)
    lse = np.log(np.exp(logits).sum(-1))
    t = np.asarray(targets)
    want = [lse[0, i] - logits[0, i, t[0, i]] for i in range(8) if valid[0, i]]
    assert float(ce) == pytest.approx(sum(want), rel=1e-5)
    assert float(z) == pytest.approx(sum(lse[0, i] ** 2 for i in range(8) if valid[0, i]), rel=1e-5)
    assert float(n) == 5
    # changing logits at masked positions (2, 6, 7) changes nothing
    logits2 = logits.copy()
    logits2[0, [2, 6, 7]] += 100.0
    ce2, _, _ = losses.cross_entropy_sums(jnp.asarray(logits2), targets, valid)
    assert float(ce2) == pytest.approx(float(ce), rel=1e-6)


@pytest.fixture(scope="module")
def moe_model():
    cfg = qwen35_jax.get_config("tiny-moe")
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=2, full_attention_interval=2)
    cfg = cfg.replace(text_config=text)
    return cfg, qwen35_jax.init_params(cfg, jax.random.key(0))


RUNTIME = qwen35_jax.Runtime(gdn_chunk_size=16)


def test_step_losses_assemble_ce_mtp_z_and_aux(moe_model):
    cfg, params = moe_model
    rng = np.random.default_rng(1)
    tok = rng.integers(0, cfg.text_config.vocab_size, size=(2, 16)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16], np.int32)
    pos = np.asarray(qwen35_jax.model.document_positions(jnp.asarray(seg)))
    batch = {
        "tokens": jnp.asarray(tok),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
    }
    n1, n2 = losses.target_counts(batch["segment_ids"], True)
    lam, zc = 0.3, 1e-3
    objective, sums = micro_losses(
        cfg,
        params,
        batch,
        mtp_lambda=lam,
        z_loss=zc,
        n_main=n1,
        n_mtp=n2,
        num_micro=1,
        runtime=RUNTIME,
    )

    out = qwen35_jax.apply(
        cfg, params, tok, segment_ids=seg, positions=pos, return_mtp=True, runtime=RUNTIME
    )
    logits, mtp = np.asarray(out.logits), np.asarray(out.mtp_logits)

    def ce_at(lg, b, t, target):
        return np.log(np.exp(lg[b, t] - lg[b, t].max()).sum()) + lg[b, t].max() - lg[b, t, target]

    main, mtp_terms, zs = [], [], []
    for b in range(2):
        for t in range(16):
            if seg[b, t] and t + 1 < 16 and seg[b, t + 1] == seg[b, t]:
                main.append(ce_at(logits, b, t, tok[b, t + 1]))
                zs.append(np.log(np.exp(logits[b, t]).sum()) ** 2)
            if seg[b, t] and t + 2 < 16 and seg[b, t + 1] == seg[b, t] == seg[b, t + 2]:
                mtp_terms.append(ce_at(mtp, b, t, tok[b, t + 2]))  # t predicts t + 2
    assert float(n1) == len(main) and float(n2) == len(mtp_terms)
    coef = cfg.text_config.router_aux_loss_coef
    want = np.mean(main) + zc * np.mean(zs) + lam * np.mean(mtp_terms) + coef * float(out.aux_loss)
    assert float(objective) == pytest.approx(want, rel=1e-5)
    assert float(sums["mtp"]) / len(mtp_terms) == pytest.approx(np.mean(mtp_terms), rel=1e-5)
    assert sums["expert_load"].shape == (2, cfg.text_config.num_experts)
    # the MoE MTP layer's router statistics are reported (bug 4), dropless: nothing dropped
    t = cfg.text_config
    assert sums["mtp_expert_load"].shape == (t.mtp_num_hidden_layers, t.num_experts)
    np.testing.assert_allclose(sums["mtp_expert_load"].sum(-1), t.num_experts_per_tok, rtol=1e-5)
    assert float(sums["mtp_aux"]) == pytest.approx(float(out.mtp_aux_loss), rel=1e-6)
    assert float(sums["mtp_aux"]) > 0 and float(sums["dropped"]) == 0


@pytest.mark.parametrize("chunk, row_groups", [(8, 1), (37, 1), (64, 1), (8, 2), (37, 4)])
def test_chunked_cross_entropy_equals_full_logits_values_and_grads(chunk, row_groups):
    """T = 37 is not a multiple of 8 (padded chunk), equal to 37 (one chunk), below 64; the 4
    rows in 1, 2 or 4 groups (2 or 1 rows per step)."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(4, 37, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 50)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(4, 37)), jnp.int32)
    valid = jnp.asarray(rng.random((4, 37)) < 0.8)

    def full(h, w):
        ce, z, n = losses.cross_entropy_sums(jnp.einsum("btd,dv->btv", h, w), targets, valid)
        return ce + 1e-2 * z, (ce, z, n)

    def chunked(h, w):
        ce, z, n = losses.chunked_cross_entropy_sums(
            h, w, targets, valid, chunk=chunk, row_groups=row_groups
        )
        return ce + 1e-2 * z, (ce, z, n)

    (_, want), gw = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
    (_, got), gg = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    for a, b in zip(got, want, strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    for a, b in zip(gg, gw, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def head_model():
    """One attention layer with MoE and the MTP head: the chunked loss only concerns the heads
    (cheaper to compile than `moe_model`'s Gated DeltaNet layer)."""
    cfg = qwen35_jax.get_config("tiny-moe")
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=1, full_attention_interval=1)
    cfg = cfg.replace(text_config=text)
    return cfg, qwen35_jax.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("tied", [True, False])
def test_step_loss_chunk_matches_whole_logits(head_model, tied):
    """train.loss_chunk: same objective, metric sums and gradients as the whole-logits path
    (main and MTP heads, z-loss, MoE aux; tied and untied output projections)."""
    cfg, params = head_model
    if not tied:  # an lm_head of its own (random, no second init compile)
        text = dataclasses.replace(cfg.text_config, tie_word_embeddings=False)
        cfg = cfg.replace(text_config=text)
        d, v = params["embed_tokens"].shape[::-1]
        head = np.random.default_rng(1).normal(0, 0.02, (d, v)).astype(np.float32)
        params = dict(params, lm_head=jnp.asarray(head))
    rng = np.random.default_rng(3)
    tok = rng.integers(0, cfg.text_config.vocab_size, size=(2, 16)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16], np.int32)
    batch = {"tokens": jnp.asarray(tok), "segment_ids": jnp.asarray(seg)}
    n1, n2 = losses.target_counts(batch["segment_ids"], True)
    kw = dict(mtp_lambda=0.3, z_loss=1e-3, n_main=n1, n_mtp=n2, num_micro=1, runtime=RUNTIME)

    def run(chunk, row_groups=1):
        fn = lambda p: micro_losses(  # noqa: E731
            cfg, p, batch, loss_chunk=chunk, loss_row_groups=row_groups, **kw
        )
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (obj0, sums0), g0 = run(0)
    flat0 = jax.tree.leaves(g0)
    # 16 positions: chunks of 6, 6 and 4 (+2 padded); both rows at once, then one at a time
    for (obj1, sums1), g1 in (run(6), run(6, row_groups=2)):
        assert float(obj1) == pytest.approx(float(obj0), rel=1e-6)
        for k in ("ce", "z", "mtp"):
            assert float(sums1[k]) == pytest.approx(float(sums0[k]), rel=1e-6)
        flat1 = jax.tree.leaves(g1)
        assert len(flat0) == len(flat1)
        for a, b in zip(flat1, flat0, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
