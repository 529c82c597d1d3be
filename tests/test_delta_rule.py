"""Tests of the chunkwise gated delta rule against token-by-token recurrences.

References: a float64 NumPy recurrence (values) and a float32 ``lax.scan`` recurrence (gradients,
by autodiff). Errors are ``max|diff| / max|ref|``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qwen35_jax.ops import (
    apply_affine_map,
    chunk_affine_maps,
    compose_affine_maps,
    gated_delta_rule,
    gated_delta_rule_step,
)
from qwen35_jax.ops import delta_rule as dr


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _inputs(seed, B, T, H, K, V, g_low=-3.0, g_high=0.0, dtype=np.float32):
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=(B, T, H, K)))
    k = unit(rng.normal(size=(B, T, H, K)))
    v = rng.normal(size=(B, T, H, V))
    g = rng.uniform(g_low, g_high, size=(B, T, H))
    beta = rng.uniform(0.0, 1.0, size=(B, T, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, g, beta))


def _doc_starts(segment_ids_BT):
    seg = np.asarray(segment_ids_BT)
    prev = np.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
    return (seg != prev) & (seg != 0), seg == 0


def _numpy_reference(q, k, v, g, beta, segment_ids=None, initial_state=None):
    """float64 token-by-token recurrence; returns (o [B,T,H,V], final state [B,H,K,V])."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    q = q / np.sqrt(K)
    S = np.zeros((B, H, K, V)) if initial_state is None else np.array(initial_state, np.float64)
    if segment_ids is None:
        reset, pad = np.zeros((B, T), bool), np.zeros((B, T), bool)
    else:
        reset, pad = _doc_starts(segment_ids)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        S = np.where(reset[:, t, None, None, None], 0.0, S)
        S_new = np.exp(g[:, t])[..., None, None] * S
        pred = np.einsum("bhkv,bhk->bhv", S_new, k[:, t])
        delta = beta[:, t][..., None] * (v[:, t] - pred)
        S_new = S_new + k[:, t][..., :, None] * delta[..., None, :]
        S = np.where(pad[:, t, None, None, None], S, S_new)
        o[:, t] = np.where(pad[:, t, None, None], 0.0, np.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return o, S


def _scan_reference(q, k, v, g, beta, initial_state, segment_ids=None):
    """float32 token-by-token recurrence in JAX (for gradients); returns (o, final state).

    A document start multiplies the previous state by 0 instead of e^{g}; padding has g = 0,
    beta = 0 and output 0.
    """
    Bq, Tq = q.shape[:2]
    if segment_ids is None:
        reset, pad = np.zeros((Bq, Tq), bool), np.zeros((Bq, Tq), bool)
    else:
        reset, pad = _doc_starts(segment_ids)
    pad_BT11 = jnp.asarray(pad)[..., None, None]
    g = jnp.where(pad_BT11[..., 0], 0.0, g)
    beta = jnp.where(pad_BT11[..., 0], 0.0, beta)
    q = q.astype(jnp.float32) / np.sqrt(q.shape[-1])

    def step(S_BHKV, x):
        q_BHK, k_BHK, v_BHV, g_BH, beta_BH, reset_B = x
        decay_BH = jnp.where(reset_B[:, None], 0.0, jnp.exp(g_BH))
        S_BHKV = decay_BH[..., None, None] * S_BHKV
        pred_BHV = jnp.einsum("bhkv,bhk->bhv", S_BHKV, k_BHK, precision="highest")
        delta_BHV = beta_BH[..., None] * (v_BHV - pred_BHV)
        S_BHKV = S_BHKV + k_BHK[..., :, None] * delta_BHV[..., None, :]
        return S_BHKV, jnp.einsum("bhkv,bhk->bhv", S_BHKV, q_BHK, precision="highest")

    xs = tuple(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v, g, beta))
    S, o_TBHV = lax.scan(step, initial_state, xs + (jnp.asarray(reset).T,))
    return jnp.where(pad_BT11, 0.0, jnp.swapaxes(o_TBHV, 0, 1)), S


def _loss_fn(rule):
    """Scalar loss of (q, k, v, g, beta, S0) touching every output and the final state."""

    def loss(q, k, v, g, beta, S0):
        o, S = rule(q, k, v, g, beta, S0)
        w_o = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        w_S = jnp.sin(jnp.arange(S.size, dtype=jnp.float32)).reshape(S.shape)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(S * w_S)

    return loss


def _chunked(chunk_size):
    def rule(q, k, v, g, beta, S0):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=S0, chunk_size=chunk_size, return_final_state=True
        )

    return rule


B, T, H, K, V = 2, 150, 3, 16, 24  # T is not a multiple of the chunk; K != V
_ARGNUMS = (0, 1, 2, 3, 4, 5)
_grad_chunked32 = jax.jit(jax.grad(_loss_fn(_chunked(32)), _ARGNUMS))


@pytest.fixture(scope="module")
def case():
    q, k, v, g, beta = _inputs(0, B, T, H, K, V)
    S0 = jnp.asarray(np.random.default_rng(1).normal(size=(B, H, K, V)) * 0.5, jnp.float32)
    return q, k, v, g, beta, S0


def test_values_match_float64_recurrence(case):
    q, k, v, g, beta, S0 = case
    o_ref, S_ref = _numpy_reference(q, k, v, g, beta, initial_state=S0)
    o, S = _chunked(16)(q, k, v, g, beta, S0)
    assert o.dtype == jnp.float32 and o.shape == (B, T, H, V)
    assert S.dtype == jnp.float32 and S.shape == (B, H, K, V)
    assert _rel(o, o_ref) < 1e-4
    assert _rel(S, S_ref) < 1e-4
    # No initial state, no final state, one chunk larger than half the sequence.
    o_only = gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    assert _rel(o_only, _numpy_reference(q, k, v, g, beta)[0]) < 1e-4


def test_gradients_match_autodiff_of_scan(case):
    grads = _grad_chunked32(*case)
    grads_ref = jax.jit(jax.grad(_loss_fn(_scan_reference), _ARGNUMS))(*case)
    for name, g_, g_ref in zip(("q", "k", "v", "g", "beta", "S0"), grads, grads_ref, strict=True):
        assert _rel(g_, g_ref) < 1e-4, name


def test_bfloat16_inputs(case):
    args16 = tuple(x.astype(jnp.bfloat16) for x in case[:5]) + (case[5],)
    args32 = tuple(x.astype(jnp.float32) for x in args16)
    rule = _chunked(32)
    o16, S16 = rule(*args16)
    o32, S32 = rule(*args32)
    assert o16.dtype == jnp.bfloat16 and S16.dtype == jnp.float32
    assert _rel(o16, o32) < 5e-3
    assert _rel(S16, S32) < 1e-5
    grads16 = jax.jit(jax.grad(_loss_fn(rule), _ARGNUMS))(*args16)
    for g16, g32 in zip(grads16[:5], _grad_chunked32(*args32)[:5], strict=True):
        assert g16.dtype == jnp.bfloat16
        assert _rel(g16, g32) < 1e-2


def _packed_case():
    # chunk 16: documents start mid-chunk (5, 21, 35, 40), a document starts right after padding
    # inside a chunk (34), and padding ends row 0.
    seg = np.zeros((2, 70), np.int32)
    seg[0, :5], seg[0, 5:21], seg[0, 21:30], seg[0, 34:40], seg[0, 40:61] = 1, 2, 3, 3, 4
    seg[1, :35], seg[1, 35:] = 7, 9
    return seg


def test_packed_documents_equal_separate_runs():
    seg = _packed_case()
    q, k, v, g, beta = _inputs(2, 2, seg.shape[1], H, K, V)
    S0 = jnp.asarray(np.random.default_rng(3).normal(size=(2, H, K, V)), jnp.float32)
    o, S = gated_delta_rule(
        q, k, v, g, beta, segment_ids=seg, initial_state=S0, chunk_size=16, return_final_state=True
    )
    o_ref, S_ref = _numpy_reference(q, k, v, g, beta, segment_ids=seg, initial_state=S0)
    assert _rel(o, o_ref) < 1e-4 and _rel(S, S_ref) < 1e-4
    assert np.all(np.asarray(o)[seg == 0] == 0.0)

    # Every document alone, as one batch left-aligned (trailing zeros with g = beta = 0 do not
    # touch the state): the first document of a row continues from S0, later ones start at 0.
    reset, pad = _doc_starts(seg)
    docs, inits, last_of_row = [], [], []
    for b in range(2):
        starts = [0] + list(np.flatnonzero(reset[b])) + [seg.shape[1]]
        for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            docs.append((b, np.arange(lo, hi)[~pad[b, lo:hi]]))
            inits.append(S0[b] if i == 0 else jnp.zeros_like(S0[b]))
            last_of_row.append(i == len(starts) - 2)
    L = max(len(idx) for _, idx in docs)
    batch = [np.zeros((len(docs), L) + x.shape[2:], np.float32) for x in (q, k, v, g, beta)]
    for n, (b, idx) in enumerate(docs):
        for dst, src in zip(batch, (q, k, v, g, beta), strict=True):
            dst[n, : len(idx)] = np.asarray(src)[b, idx]
    o_docs, S_docs = gated_delta_rule(
        *batch, initial_state=jnp.stack(inits), chunk_size=16, return_final_state=True
    )
    for n, (b, idx) in enumerate(docs):
        assert _rel(np.asarray(o)[b, idx], o_docs[n, : len(idx)]) < 1e-5
        if last_of_row[n]:
            assert _rel(S[b], S_docs[n]) < 1e-5

    # Gradients through resets and padding match the float32 recurrence with explicit resets.
    def packed(q, k, v, g, beta, S0):
        return gated_delta_rule(
            q, k, v, g, beta, segment_ids=seg, initial_state=S0, chunk_size=16,
            return_final_state=True,
        )  # fmt: skip

    def scan_packed(q, k, v, g, beta, S0):
        return _scan_reference(q, k, v, g, beta, S0, segment_ids=seg)

    argnums = (0, 1, 2, 3, 4, 5)
    grads = jax.jit(jax.grad(_loss_fn(packed), argnums))(q, k, v, g, beta, S0)
    grads_ref = jax.jit(jax.grad(_loss_fn(scan_packed), argnums))(q, k, v, g, beta, S0)
    for name, g_, g_ref in zip(("q", "k", "v", "g", "beta", "S0"), grads, grads_ref, strict=True):
        assert np.all(np.isfinite(g_)), name
        assert _rel(g_, g_ref) < 1e-4, name


def test_decode_steps_continue_prefill(case):
    q, k, v, g, beta, S0 = case
    T0 = 131
    o_full, S_full = _chunked(32)(q, k, v, g, beta, S0)
    o_pre, S = gated_delta_rule(
        *(x[:, :T0] for x in (q, k, v, g, beta)),
        initial_state=S0,
        chunk_size=32,
        return_final_state=True,
    )
    outs = [o_pre]
    for t in range(T0, T):
        o_t, S = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        outs.append(o_t[:, None])
    assert _rel(jnp.concatenate(outs, axis=1), o_full) < 1e-5
    assert _rel(S, S_full) < 1e-5


_grad_sum_squares = jax.jit(
    jax.grad(lambda *a: jnp.sum(gated_delta_rule(*a) ** 2), (0, 1, 2, 3, 4))
)


@pytest.mark.parametrize(
    "g_low,g_high",
    [(-20.0, -20.0), (-20.0, 0.0), (-1e-6, -1e-6), (-1e-6, 0.0)],
    ids=["g=-20", "g~U(-20,0)", "g=-1e-6", "g~U(-1e-6,0)"],
)
def test_extreme_decays(g_low, g_high):
    x = _inputs(4, 1, 200, 2, K, V, g_low=g_low, g_high=g_high)
    o, S = gated_delta_rule(*x, chunk_size=64, return_final_state=True)
    o_ref, S_ref = _numpy_reference(*x)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(S))
    assert _rel(o, o_ref) < 1e-4 and _rel(S, S_ref) < 1e-4
    grads = _grad_sum_squares(*x)
    assert all(np.all(np.isfinite(gr)) for gr in grads)


def test_long_sequence_numerics():
    x = _inputs(5, 1, 65536, 1, 16, 16, g_low=-0.05)
    o, S = gated_delta_rule(*x, chunk_size=64, return_final_state=True)
    o_ref, S_ref = _numpy_reference(*x)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(S))
    assert _rel(o, o_ref) < 1e-4 and _rel(S, S_ref) < 1e-4


def _fwd_bwd_temp_bytes(T_, H_, K_, V_, C):
    """XLA temp bytes of jit(grad) of a loss of the outputs w.r.t. q, k, v, g, beta."""
    shapes = [(1, T_, H_, K_), (1, T_, H_, K_), (1, T_, H_, V_), (1, T_, H_), (1, T_, H_)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

    def loss(*a):  # the un-jitted core, so each call traces with the current module settings
        return jnp.sum(dr._gated_delta_rule(*a, None, None, None, C)[0] ** 2)

    compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_memory_is_linear_and_does_not_store_every_state(monkeypatch):
    H_, K_, V_, C = 1, 128, 128, 64
    T1, T2 = 2048, 8192
    m1 = _fwd_bwd_temp_bytes(T1, H_, K_, V_, C)
    m2 = _fwd_bwd_temp_bytes(T2, H_, K_, V_, C)
    # Linear growth with a small constant: per token, at most 2.5x the float32 inputs (q, k, v,
    # g, beta) that the backward pass needs anyway (a layout copy and their cotangents).
    inputs_per_token = H_ * (2 * K_ + V_ + 2) * 4
    assert m2 / m1 < 4.4
    assert (m2 - m1) / (T2 - T1) < 2.5 * inputs_per_token
    # One checkpoint segment for the whole sequence: the recomputation then keeps every chunk's
    # state (and every chunk's intermediates) alive at once, like plain autodiff.
    monkeypatch.setattr(dr, "_MAX_CHUNKS_PER_SEGMENT", 10**9)
    m2_all = _fwd_bwd_temp_bytes(T2, H_, K_, V_, C)
    all_states = (T2 // C) * H_ * K_ * V_ * 4
    assert m2_all > all_states
    assert m2 < m2_all / 3


def test_affine_maps_compose_to_the_full_run():
    seg = _packed_case()
    q, k, v, g, beta = _inputs(6, 2, seg.shape[1], H, K, V)
    S0 = jnp.asarray(np.random.default_rng(7).normal(size=(2, H, K, V)), jnp.float32)
    o_full, S_full = gated_delta_rule(
        q, k, v, g, beta, segment_ids=seg, initial_state=S0, chunk_size=16, return_final_state=True
    )
    # Cut at 35: row 0 is inside a document (mid-chunk), row 1 starts a document at the cut.
    cut = 35
    lo = tuple(x[:, :cut] for x in (q, k, v, g, beta))
    hi = tuple(x[:, cut:] for x in (q, k, v, g, beta))
    seg_lo, seg_hi = jnp.asarray(seg[:, :cut]), jnp.asarray(seg[:, cut:])
    # prev id = own first id for the first slice: no reset at its token 0.
    maps_lo = chunk_affine_maps(*lo[1:], segment_ids=seg_lo, prev_segment_ids=seg_lo[:, 0])
    maps_hi = chunk_affine_maps(*hi[1:], segment_ids=seg_hi, prev_segment_ids=seg_lo[:, -1])
    assert maps_lo[0].shape == (2, H, K, K) and maps_lo[1].shape == (2, H, K, V)
    S_mid = apply_affine_map(maps_lo, S0)
    assert _rel(apply_affine_map(compose_affine_maps(maps_lo, maps_hi), S0), S_full) < 1e-4
    assert _rel(apply_affine_map(maps_hi, S_mid), S_full) < 1e-4
    o_hi = gated_delta_rule(
        *hi, segment_ids=seg_hi, prev_segment_ids=seg_lo[:, -1], initial_state=S_mid,
        chunk_size=16,
    )  # fmt: skip
    assert _rel(o_hi, o_full[:, cut:]) < 1e-4
    assert np.all(np.asarray(maps_hi[0])[1] == 0.0)  # row 1 resets at the cut: forgets S_mid


def test_compose_is_associative():
    rng = np.random.default_rng(8)
    maps = [
        (
            jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32),
            jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32),
        )
        for _ in range(3)
    ]
    left = compose_affine_maps(compose_affine_maps(maps[0], maps[1]), maps[2])
    right = compose_affine_maps(maps[0], compose_affine_maps(maps[1], maps[2]))
    for a, b in zip(left, right, strict=True):
        assert _rel(a, b) < 1e-5


def test_cpu_blocked_solve_matches_triangular_solve():
    rng = np.random.default_rng(9)
    N = jnp.asarray(np.tril(rng.normal(size=(3, 64, 64)) * 0.3, -1), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 64, 40)), jnp.float32)
    x = dr.blocked_unit_lower_solve(N, rhs)
    x_ref = lax.linalg.triangular_solve(
        N + jnp.eye(64, dtype=jnp.float32)[None], rhs, left_side=True, lower=True,
        unit_diagonal=True,
    )  # fmt: skip
    assert _rel(x, x_ref) < 1e-5


def test_accelerator_branch_forced_on_cpu_equals_the_cpu_branch(case, monkeypatch):
    """The kernel with `lax.linalg.triangular_solve` (the non-CPU branch of `unit_lower_solve`)
    run here: values, final state and gradients of all six inputs equal the CPU branch's, with
    packed documents and padding, so the first accelerator run does not meet untested code."""
    q, k, v, g, beta, S0 = case
    seg = jnp.asarray(np.repeat(np.array([[1] * 40 + [2] * 100 + [0] * 10]), B, axis=0))

    def rule(q, k, v, g, beta, S0):
        return gated_delta_rule(
            q, k, v, g, beta, segment_ids=seg, initial_state=S0, chunk_size=32,
            return_final_state=True,
        )  # fmt: skip

    def run():
        jax.clear_caches()  # the branch is chosen when traced: retrace
        fn = jax.jit(jax.value_and_grad(_loss_fn(rule), _ARGNUMS))
        hlo = fn.lower(q, k, v, g, beta, S0).compile().as_text()
        return rule(q, k, v, g, beta, S0), fn(q, k, v, g, beta, S0), hlo

    (o_cpu, s_cpu), (loss_cpu, g_cpu), hlo_cpu = run()
    monkeypatch.setattr(dr, "blocked_unit_lower_solve", dr.native_unit_lower_solve)
    (o_acc, s_acc), (loss_acc, g_acc), hlo_acc = run()
    assert "trsm" in hlo_acc.lower() and "trsm" not in hlo_cpu.lower()  # LAPACK triangular solve
    assert _rel(o_acc, o_cpu) < 1e-5 and _rel(s_acc, s_cpu) < 1e-5
    assert float(loss_acc) == pytest.approx(float(loss_cpu), rel=1e-5)
    for a, b in zip(g_acc, g_cpu, strict=True):
        assert _rel(a, b) < 1e-4
