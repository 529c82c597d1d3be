"""Sequence parallelism for the gated delta rule: each device runs its own slice of the tokens.

Axis letters as in ``delta_rule.py`` (B batch, T tokens, H heads, K key dim, V value dim) plus
N devices on the sequence mesh axis; device i holds tokens [i T/N, (i+1) T/N) and W is the
causal conv width.

A slice transforms the state that enters it affinely (document starts inside the slice reset it,
padding leaves it untouched), and so are its outputs::

    S_t = A_t S_in + Bm_t          (A_t: K×K, Bm_t: K×V, per batch row and head)
    o_t = S_t^T q_t = S_in^T a_t + b_t,    a_t = A_t^T q_t,  b_t = Bm_t^T q_t

One local pass of the chunk kernel on the augmented state ``[A | Bm]`` (K×(K+V)), started from
``[I | 0]`` with values ``[0 | v]``, yields both: its outputs are ``[a_t | b_t]`` and its final
state is the slice's map ``(A_i, Bm_i)``. Then, per device::

    (A_j, Bm_j)_{j<N} = all_gather over the sequence axis
    S_in_i = (S -> A_{i-1} S + Bm_{i-1}) o ... o (S -> A_0 S + Bm_0) (S_init)      N-1 matmuls
    o_t    = S_in_i^T a_t + b_t
    S_final = the same fold over all N maps (equal on every device)

Cost: the augmented pass is about (K+V)/V times a plain local pass, plus the fold
(N K²(K+V) per row and head) and one all_gather of N maps; no step waits on another device's
kernel. Whether token 0 of a slice starts a document depends on the token before it:
``prev_segment_ids`` is the last segment id of device i-1 (sent by ``ppermute``); device 0
continues ``S_init`` as the single-device kernel does.

The causal conv before the recurrence needs a halo: ``previous_tokens(x, W-1)`` gives each
device the last W-1 tokens of device i-1 (device 0: ``fill``, zeros for features and -1, "no
document", for segment ids), so a conv over ``[halo; x]`` equals the single-device conv.

``local_gated_delta_rule`` and ``previous_tokens`` run inside ``jax.shard_map`` (per device);
``sequence_parallel_gated_delta_rule`` wraps the former in a ``shard_map`` that is manual over the
sequence axis only (every other mesh axis stays under the compiler's sharding propagation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from qwen35_jax import sharding
from qwen35_jax.ops.delta_rule import (
    _einsum,
    _gated_delta_rule,
    apply_affine_map,
    gated_delta_rule,
)

# the mesh axis the sharding table gives to the `length` of activations (its one authority)
(SEQUENCE,) = sharding.mesh_axes_of("length")


def sequence_axis_size(mesh: jax.sharding.AbstractMesh | None = None, axis: str = SEQUENCE) -> int:
    """Size of the sequence axis of ``mesh`` (default: the ambient ``jax.set_mesh``), 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis]


def previous_tokens(
    x_BT: jax.Array, count: int, axis_name: str = SEQUENCE, fill: float | int = 0
) -> jax.Array:
    """The last ``count`` tokens (axis 1) of the previous device's slice; ``fill`` on device 0.

    Per device, inside ``shard_map``. ``x_BT`` is [B, T_local, ...] with T_local >= count.
    """
    if count > x_BT.shape[1]:
        raise ValueError(f"halo of {count} tokens from a slice of {x_BT.shape[1]} tokens")
    n = lax.axis_size(axis_name)
    tail_BT = x_BT[:, x_BT.shape[1] - count :]
    if fill:  # ppermute fills device 0 with zeros: shift so that zeros read as `fill`
        tail_BT = tail_BT - jnp.asarray(fill, x_BT.dtype)
    got_BT = lax.ppermute(tail_BT, axis_name, [(j, j + 1) for j in range(n - 1)])
    if fill:
        got_BT = got_BT + jnp.asarray(fill, x_BT.dtype)
    return got_BT


def local_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    prev_segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """One device's slice of ``gated_delta_rule`` (inside ``shard_map`` over ``axis_name``).

    Args are those of ``gated_delta_rule`` for the local slice [B, T_local, ...].
    ``prev_segment_ids`` [B]: the segment id of the previous device's last token (fetched here
    when None; ignored on device 0). ``initial_state`` [B, H, K, V]: the state before the whole
    sequence, the same on every device (default zeros).

    Returns (o [B, T_local, H, V] float32, final state of the whole sequence [B, H, K, V] float32,
    invariant over ``axis_name``).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    n = lax.axis_size(axis_name)
    i = lax.axis_index(axis_name)
    prev_B = None
    if segment_ids is not None:
        if prev_segment_ids is None:
            prev_segment_ids = previous_tokens(segment_ids, 1, axis_name)[:, 0]
        # device 0 continues the initial state: its token 0 never resets
        prev_B = jnp.where(i == 0, segment_ids[:, 0], prev_segment_ids).astype(jnp.int32)

    v_aug_BTHW = jnp.concatenate(
        [jnp.zeros((B, T, H, K), jnp.float32), v.astype(jnp.float32)], axis=-1
    )
    eye_BHKK = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
    init_BHKW = jnp.concatenate([eye_BHKK, jnp.zeros((B, H, K, V), jnp.float32)], axis=-1)
    init_BHKW = lax.pcast(init_BHKW, (axis_name,), to="varying")  # the scan carry varies
    o_aug_BTHW, map_BHKW = _gated_delta_rule(
        q, k, v_aug_BTHW, g, beta, segment_ids, prev_B, init_BHKW, chunk_size
    )
    a_BTHK, b_BTHV = o_aug_BTHW[..., :K], o_aug_BTHW[..., K:]

    maps_NBHKW = lax.all_gather(map_BHKW, axis_name, to="invarying")
    if initial_state is None:
        state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    else:
        state_BHKV = initial_state.astype(jnp.float32)
    incoming_BHKV = state_BHKV
    for j in range(n):
        incoming_BHKV = jnp.where(i == j, state_BHKV, incoming_BHKV)
        state_BHKV = apply_affine_map((maps_NBHKW[j, ..., :K], maps_NBHKW[j, ..., K:]), state_BHKV)
    o_BTHV = b_BTHV + _einsum("bthk,bhkv->bthv", a_BTHK, incoming_BHKV)
    return o_BTHV, state_BHKV


def sequence_parallel_gated_delta_rule(
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
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    axis_name: str = SEQUENCE,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``gated_delta_rule`` with the tokens split over the mesh axis ``axis_name``.

    Same arguments and results as ``gated_delta_rule``; ``mesh`` defaults to the ambient one
    (``jax.set_mesh``). T must divide by the axis size. Call it under ``jax.jit``. Without that
    axis (or with size 1) this is ``gated_delta_rule``.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    n = sequence_axis_size(mesh, axis_name)
    if n == 1:
        return gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            segment_ids=segment_ids,
            initial_state=initial_state,
            chunk_size=chunk_size,
            return_final_state=return_final_state,
        )
    T = q.shape[1]
    if T % n:
        raise ValueError(f"{T} tokens do not divide over {axis_name}={n}")
    tok = P(None, axis_name)
    has_seg, has_init = segment_ids is not None, initial_state is not None
    args = [q, k, v, g, beta]
    specs = [tok] * 5
    if has_seg:
        args.append(segment_ids)
        specs.append(tok)
    if has_init:
        args.append(initial_state)
        specs.append(P())

    def body(q, k, v, g, beta, *rest):
        seg = rest[0] if has_seg else None
        init = rest[-1] if has_init else None
        return local_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            segment_ids=seg,
            initial_state=init,
            chunk_size=chunk_size,
            axis_name=axis_name,
        )

    o_BTHV, state_BHKV = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=(tok, P()),
        axis_names={axis_name},
    )(*args)
    o_BTHV = o_BTHV.astype(v.dtype)
    if return_final_state:
        return o_BTHV, state_BHKV
    return o_BTHV
