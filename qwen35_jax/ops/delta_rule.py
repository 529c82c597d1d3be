"""Gated delta rule (the recurrence of Gated DeltaNet), chunkwise-parallel, in pure JAX.

Axis letters (the package legend in ``qwen35_jax/__init__.py``): B batch, T tokens, H heads,
K key dim, V value dim, C chunk length, Q chunks (or blocks), X any leading axes; the chunk scan
is laid out as [G, S, ...]: G checkpoint segments of S chunks (these two meanings of G and S are
local to this file).

Recurrence, per head, with state ``S`` of shape K×V (HF ``torch_recurrent_gated_delta_rule``)::

    S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T
    o_t = S_t^T q_t / sqrt(K)

``g`` is the log decay (<= 0), ``beta`` the write strength; q and k arrive L2-normalised.

Chunkwise (WY/UT) form. Inside a chunk of C tokens with incoming state ``S0``, write
``L_ij = sum_{j<l<=i} g_l`` (i >= j), ``Gam_ij = exp(L_ij)`` on and below the diagonal and 0 above,
``gam_i = exp(sum_{l<=i} g_l)`` (decay since the chunk start) and ``dlt_j = Gam_{C-1,j}`` (decay to
the chunk end). The delta-rule "new values" ``u_j = beta_j (v_j - e^{g_j} S_{j-1}^T k_j)`` solve
the unit-lower-triangular system

    (I + A) U = diag(beta) V - diag(beta * gam) K S0,    A_jl = beta_j Gam_jl k_j.k_l  (l < j)

so ``U = Wv - Wk S0`` with ``[Wv | Wk] = (I + A)^{-1} [diag(beta) V | diag(beta * gam) K]``
(one triangular solve, float32). Then

    O     = diag(gam) Q S0 + tril(Q K^T * Gam) U   = O_intra + Q_eff S0
    S_out = gam_{C-1} S0 + (diag(dlt) K)^T U

Everything that does not involve ``S0`` is computed in parallel over chunks; a ``lax.scan``
carries the K×V state across chunks. ``L`` is formed as a masked cumulative sum (never as a
difference of two long cumulative sums, which loses precision) and masked *before* ``exp``.

Packed sequences. A token whose segment id is nonzero and differs from the previous token's
starts a document: its state is reset to zero before its update, which is exactly the recurrence
with ``g_t = -inf``; we use the finite ``_RESET_LOG_DECAY`` so the chunk sums stay NaN-free and
every decay that crosses a document start is exactly 0 after ``exp``. Segment id 0 is padding:
``g = 0, beta = 0`` (state untouched) and output 0. Token 0 of a call never resets (it starts
from ``initial_state``) unless ``prev_segment_ids`` (the id of the token before the slice, for
sequence parallelism) says it does.

Memory. The chunk scan is grouped into G checkpoint segments of S chunks: autodiff keeps the
state at each segment start only (G×K×V) and recomputes a segment's internals in the backward
pass, so forward+backward memory is the (float32) inputs plus O(T/(S·C)·K·V + S·C·(C+K+V)).

Affine maps (sequence parallelism). A slice of tokens maps its incoming state affinely,
``S -> A S + Bm`` (A: K×K, Bm: K×V). Running the same kernel on the augmented state
``[A | Bm]`` (K×(K+V)) with values ``[0 | v]`` from ``[I | 0]`` yields the slice's map; maps
compose associatively with ``compose_affine_maps``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST
# Log decay standing in for -inf at a document start; C * this stays finite in float32.
_RESET_LOG_DECAY = -1e30
# Chunks per checkpoint segment (upper bound; the actual count balances the segments). On CPU at
# K=V=128, 4 was both faster and smaller than 8, 16 or 32: the saved states cost K*V/(4*C) floats
# per token and head, a sixth of the float32 q, k, v that the backward pass keeps anyway.
_MAX_CHUNKS_PER_SEGMENT = 4
# Block size of the CPU triangular solve (diagonal blocks inverted, the rest by matmuls).
_SOLVE_BLOCK = 16


def _einsum(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _token_flags(segment_ids_BT: jax.Array, prev_segment_ids_B: jax.Array | None):
    """Returns (reset_BT, pad_BT): document starts and padding tokens."""
    seg_BT = segment_ids_BT.astype(jnp.int32)
    if prev_segment_ids_B is None:
        prev_B1 = seg_BT[:, :1]  # token 0 never resets
    else:
        prev_B1 = prev_segment_ids_B.astype(jnp.int32)[:, None]
    prev_BT = jnp.concatenate([prev_B1, seg_BT[:, :-1]], axis=1)
    pad_BT = seg_BT == 0
    reset_BT = (seg_BT != prev_BT) & ~pad_BT
    return reset_BT, pad_BT


def _invert_unit_lower(N_XBB: jax.Array) -> jax.Array:
    """(I + N)^{-1} for a small strictly-lower-triangular N, by recursive 2x2 block substitution.

    [[A, 0], [C, D]]^{-1} = [[A^{-1}, 0], [-D^{-1} C A^{-1}, D^{-1}]]: exact (no series), the two
    diagonal halves are inverted together as one batch, and there is no loop to compile.
    """
    n = N_XBB.shape[-1]
    if n == 1:
        return jnp.ones_like(N_XBB)
    h = n // 2
    A_XHH, C_XRH, D_XRR = N_XBB[..., :h, :h], N_XBB[..., h:, :h], N_XBB[..., h:, h:]
    if n == 2 * h:
        inv_X2HH = _invert_unit_lower(jnp.stack([A_XHH, D_XRR], axis=-3))
        Ainv_XHH, Dinv_XRR = inv_X2HH[..., 0, :, :], inv_X2HH[..., 1, :, :]
    else:
        Ainv_XHH, Dinv_XRR = _invert_unit_lower(A_XHH), _invert_unit_lower(D_XRR)
    off_XRH = -_einsum("...ij,...jk,...kl->...il", Dinv_XRR, C_XRH, Ainv_XHH)
    top_XHB = jnp.concatenate([Ainv_XHH, jnp.zeros(A_XHH.shape[:-1] + (n - h,), A_XHH.dtype)], -1)
    return jnp.concatenate([top_XHB, jnp.concatenate([off_XRH, Dinv_XRR], axis=-1)], axis=-2)


def blocked_unit_lower_solve(N_XCC: jax.Array, rhs_XCW: jax.Array) -> jax.Array:
    """Solves (I + N) X = rhs, N strictly lower, by blocked forward substitution (matmuls);
    the CPU branch of `unit_lower_solve`."""
    C = N_XCC.shape[-1]
    b = _SOLVE_BLOCK if C % _SOLVE_BLOCK == 0 else C
    diag_XQBB = jnp.stack([N_XCC[..., i : i + b, i : i + b] for i in range(0, C, b)], axis=-3)
    inv_XQBB = _invert_unit_lower(diag_XQBB)
    blocks = []
    for n, i in enumerate(range(0, C, b)):
        r_XBW = rhs_XCW[..., i : i + b, :]
        if blocks:
            done_XIW = jnp.concatenate(blocks, axis=-2)
            r_XBW = r_XBW - _einsum("...ij,...jw->...iw", N_XCC[..., i : i + b, :i], done_XIW)
        blocks.append(_einsum("...ij,...jw->...iw", inv_XQBB[..., n, :, :], r_XBW))
    return jnp.concatenate(blocks, axis=-2)


def native_unit_lower_solve(N_XCC: jax.Array, rhs_XCW: jax.Array) -> jax.Array:
    """Solves (I + N) X = rhs with XLA's triangular solve; the accelerator branch of
    `unit_lower_solve`."""
    C = N_XCC.shape[-1]
    lead = (1,) * (N_XCC.ndim - 2)
    diag_XCC = jnp.eye(C, dtype=jnp.bool_).reshape(lead + (C, C))
    return lax.linalg.triangular_solve(
        jnp.where(diag_XCC, 1.0, N_XCC), rhs_XCW, left_side=True, lower=True, unit_diagonal=True
    )


def unit_lower_solve(N_XCC: jax.Array, rhs_XCW: jax.Array) -> jax.Array:
    """(I + N)^{-1} rhs for strictly-lower-triangular N, in float32.

    Accelerators use XLA's triangular solve. On CPU that op is a LAPACK call whose OpenBLAS
    threads fight XLA's own thread pool (tens of times slower on a loaded 2-core machine), so CPU
    uses the same substitution written as 16-row blocks and matmuls (also faster single-threaded).
    The branches are looked up when traced: tests/test_delta_rule.py runs the accelerator branch
    on CPU by pointing `blocked_unit_lower_solve` at `native_unit_lower_solve`.
    """
    return lax.platform_dependent(
        N_XCC, rhs_XCW, cpu=blocked_unit_lower_solve, default=native_unit_lower_solve
    )


def _chunk_terms(q_XCK, k_XCK, v_XCV, g_XC, beta_XC):
    """State-independent terms of each chunk (X: any leading batch axes).

    Returns (Wk, Qeff, Wv, O_intra, diag(dlt) K, gam_{C-1}).
    """
    C = g_XC.shape[-1]
    lead = (1,) * (g_XC.ndim - 1)  # explicit leading axes: rank promotion is an error here
    row_XCC = jnp.arange(C).reshape(lead + (C, 1))
    col_XCC = jnp.arange(C).reshape(lead + (1, C))
    strict_lower_XCC = row_XCC > col_XCC
    lower_XCC = row_XCC >= col_XCC

    # L[i, j] = sum_{j < l <= i} g_l, by a masked cumulative sum over i.
    g_XCC = jnp.broadcast_to(g_XC[..., :, None], g_XC.shape + (C,))
    L_XCC = jnp.cumsum(jnp.where(strict_lower_XCC, g_XCC, 0.0), axis=-2)
    Gam_XCC = jnp.exp(jnp.where(lower_XCC, L_XCC, -jnp.inf))
    gam_XC = jnp.exp(jnp.cumsum(g_XC, axis=-1))
    dlt_XC = Gam_XCC[..., C - 1, :]
    glast_X = gam_XC[..., C - 1]

    kk_XCC = _einsum("...ik,...jk->...ij", k_XCK, k_XCK)
    qk_XCC = _einsum("...ik,...jk->...ij", q_XCK, k_XCK)
    A_XCC = jnp.where(strict_lower_XCC, beta_XC[..., :, None] * Gam_XCC * kk_XCC, 0.0)
    rhs_XCW = jnp.concatenate(
        [beta_XC[..., None] * v_XCV, (beta_XC * gam_XC)[..., None] * k_XCK], axis=-1
    )
    W_XCW = unit_lower_solve(A_XCC, rhs_XCW)
    V = v_XCV.shape[-1]
    Wv_XCV, Wk_XCK = W_XCW[..., :V], W_XCW[..., V:]

    P_XCC = jnp.where(lower_XCC, qk_XCC * Gam_XCC, 0.0)
    Ointra_XCV = _einsum("...ij,...jv->...iv", P_XCC, Wv_XCV)
    Qeff_XCK = gam_XC[..., None] * q_XCK - _einsum("...ij,...jk->...ik", P_XCC, Wk_XCK)
    Kd_XCK = dlt_XC[..., None] * k_XCK
    return Wk_XCK, Qeff_XCK, Wv_XCV, Ointra_XCV, Kd_XCK, glast_X


def _segment(state_BHKV, xs):
    """Runs S consecutive chunks: xs = (q, k, v, g, beta), each [S, B, H, C, ...].

    Returns (state after the last chunk, o_SBHCV).
    """
    terms = _chunk_terms(*xs)

    def step(S_BHKV, t):
        Wk_BHCK, Qeff_BHCK, Wv_BHCV, Ointra_BHCV, Kd_BHCK, glast_BH = t
        U_BHCV = Wv_BHCV - _einsum("bhck,bhkv->bhcv", Wk_BHCK, S_BHKV)
        o_BHCV = Ointra_BHCV + _einsum("bhck,bhkv->bhcv", Qeff_BHCK, S_BHKV)
        S_BHKV = glast_BH[..., None, None] * S_BHKV + _einsum("bhck,bhcv->bhkv", Kd_BHCK, U_BHCV)
        return S_BHKV, o_BHCV

    return lax.scan(step, state_BHKV, terms)


def _num_segments(Q: int) -> tuple[int, int]:
    """(G, S): G checkpoint segments of S chunks each, G*S >= Q chunks with little waste."""
    G = -(-Q // _MAX_CHUNKS_PER_SEGMENT)
    S = -(-Q // G)
    return G, S


def _gated_delta_rule(q, k, v, g, beta, segment_ids, prev_segment_ids, initial_state, C):
    """float32 core: returns (o_BTHV float32, final state_BHKV)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q_BTHK = q.astype(jnp.float32) * (K**-0.5)
    k_BTHK = k.astype(jnp.float32)
    v_BTHV = v.astype(jnp.float32)
    g_BTH = g.astype(jnp.float32)
    beta_BTH = beta.astype(jnp.float32)
    pad_BT = None
    if segment_ids is not None:
        reset_BT, pad_BT = _token_flags(segment_ids, prev_segment_ids)
        g_BTH = jnp.where(pad_BT[..., None], 0.0, g_BTH)
        g_BTH = jnp.where(reset_BT[..., None], _RESET_LOG_DECAY, g_BTH)
        beta_BTH = jnp.where(pad_BT[..., None], 0.0, beta_BTH)
    if initial_state is None:
        state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    else:
        state_BHKV = initial_state.astype(jnp.float32)

    Q = -(-T // C)
    G, S = _num_segments(Q)
    Tp = G * S * C

    def chunked(x, feature_dims):
        # [B, T, H, *F] -> [G, S, B, H, C, *F]; padded tokens have g = beta = 0 (no state change).
        x = jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((B, G, S, C, H) + x.shape[3:])
        return jnp.transpose(x, (1, 2, 0, 4, 3) + tuple(range(5, 5 + feature_dims)))

    xs = (
        chunked(q_BTHK, 1),
        chunked(k_BTHK, 1),
        chunked(v_BTHV, 1),
        chunked(g_BTH, 0),
        chunked(beta_BTH, 0),
    )
    segment = jax.checkpoint(_segment, prevent_cse=False)
    state_BHKV, o_GSBHCV = lax.scan(segment, state_BHKV, xs)
    o_BTHV = jnp.transpose(o_GSBHCV, (2, 0, 1, 4, 3, 5)).reshape(B, Tp, H, V)[:, :T]
    if pad_BT is not None:
        o_BTHV = jnp.where(pad_BT[..., None, None], 0.0, o_BTHV)
    return o_BTHV, state_BHKV


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_final_state"))
def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
    prev_segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Chunkwise gated delta rule over a whole sequence.

    Args:
      q, k: [B, T, H, K], L2-normalised (q is scaled by 1/sqrt(K) here).
      v: [B, T, H, V].
      g: [B, T, H] log decay (<= 0); beta: [B, T, H] write strength.
      segment_ids: optional int [B, T]; the state resets at each document start, id 0 is padding
        (state untouched, output 0).
      initial_state: optional [B, H, K, V] state before token 0.
      chunk_size: C, tokens per chunk.
      return_final_state: also return the float32 state after the last token.
      prev_segment_ids: optional int [B], segment id of the token just before this slice (for
        sequence parallelism); token 0 then resets like any other document start.

    Returns:
      o [B, T, H, V] in v.dtype, and the final state [B, H, K, V] float32 if requested.
    """
    o_BTHV, state_BHKV = _gated_delta_rule(
        q, k, v, g, beta, segment_ids, prev_segment_ids, initial_state, chunk_size
    )
    o_BTHV = o_BTHV.astype(v.dtype)
    if return_final_state:
        return o_BTHV, state_BHKV
    return o_BTHV


@jax.jit
def gated_delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step: q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; state [B, H, K, V].

    Returns (o [B, H, V] in v.dtype, new state [B, H, K, V] float32).
    """
    K = q.shape[-1]
    q_BHK = q.astype(jnp.float32) * (K**-0.5)
    k_BHK = k.astype(jnp.float32)
    v_BHV = v.astype(jnp.float32)
    beta_BH = beta.astype(jnp.float32)
    S_BHKV = jnp.exp(g.astype(jnp.float32))[..., None, None] * state.astype(jnp.float32)
    pred_BHV = _einsum("bhkv,bhk->bhv", S_BHKV, k_BHK)
    delta_BHV = beta_BH[..., None] * (v_BHV - pred_BHV)
    S_BHKV = S_BHKV + k_BHK[..., :, None] * delta_BHV[..., None, :]
    o_BHV = _einsum("bhkv,bhk->bhv", S_BHKV, q_BHK)
    return o_BHV.astype(v.dtype), S_BHKV


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunk_affine_maps(
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    prev_segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The affine map ``S -> A S + Bm`` by which a slice of tokens transforms its incoming state.

    Args are those of ``gated_delta_rule`` for the slice (q is not needed). Returns
    (A [B, H, K, K], Bm [B, H, K, V]), float32. The slice's final state is ``A @ S_in + Bm``; its
    outputs are ``gated_delta_rule(..., initial_state=S_in, prev_segment_ids=...)``.
    Computed as the final state of the same kernel run on ``[A | Bm]`` with values ``[0 | v]``
    from ``[I | 0]`` (2x the state width of a plain run).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    v_aug_BTHW = jnp.concatenate(
        [jnp.zeros((B, T, H, K), jnp.float32), v.astype(jnp.float32)], axis=-1
    )
    eye_BHKK = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
    init_BHKW = jnp.concatenate([eye_BHKK, jnp.zeros((B, H, K, V), jnp.float32)], axis=-1)
    _, state_BHKW = _gated_delta_rule(
        k, k, v_aug_BTHW, g, beta, segment_ids, prev_segment_ids, init_BHKW, chunk_size
    )
    return state_BHKW[..., :K], state_BHKW[..., K:]


def compose_affine_maps(
    first: tuple[jax.Array, jax.Array], second: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Map of ``first`` followed by ``second``: (A2 A1, A2 B1 + B2). Associative; batched."""
    A1_XKK, B1_XKV = first
    A2_XKK, B2_XKV = second
    A_XKK = _einsum("...ij,...jk->...ik", A2_XKK, A1_XKK)
    B_XKV = _einsum("...ij,...jv->...iv", A2_XKK, B1_XKV) + B2_XKV
    return A_XKK, B_XKV


def apply_affine_map(maps: tuple[jax.Array, jax.Array], state: jax.Array) -> jax.Array:
    """``A @ state + Bm`` for maps (A [..., K, K], Bm [..., K, V]) and state [..., K, V]."""
    A_XKK, B_XKV = maps
    return _einsum("...ij,...jv->...iv", A_XKK, state.astype(jnp.float32)) + B_XKV
