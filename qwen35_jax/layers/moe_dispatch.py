"""Expert-parallel MoE dispatch: tokens travel to the devices that own their experts.

Under a mesh whose `expert` axis has Z > 1 devices, the routed experts' weights [E, D, I] are
split into Z groups of E/Z experts (the table in `sharding.py`: experts -> expert, embed -> fsdp,
mlp -> tensor), and the tokens are split over (data, fsdp, expert) x sequence. `expert_parallel`
runs under `jax.shard_map` over the whole mesh; per device, with n local tokens, m = n*k routed
rows (row r = token r // k, slot r % k) and buffers of Y rows per (source, target) device pair:

    target_r = e_r // (E/Z)                       the device that owns row r's expert
    slot_r   = #{r' < r : target_r' = target_r}   row r's place in that device's buffer
    send_ZYD[target_r, slot_r] = x[token_r]       rows with slot_r >= Y are dropped (capacity)
    recv_ZYD = all_to_all(send_ZYD)               now indexed [source device, slot]
    out_ZYD  = mlp.grouped_swiglu of recv rows on the local E/Z experts (sorted, `ragged_dot`)
    back_ZYD = all_to_all(out_ZYD)                back at the source, [target device, slot]
    y_n      = sum_k w_nk * back[target_nk, slot_nk]       (0 for a dropped row)
    y_n      = psum over the tensor axes (each device holds I / tensor of every expert's width)

Expert weights sharded over `fsdp` on the D axis are all-gathered inside (the transpose is a
reduce-scatter of their gradients). The router and the shared expert stay outside, under
the compiler's sharding propagation.

Buffers are static. Dropless (the default): Y = m, the worst case in which every row of a device
goes to one target, so nothing is ever dropped and the result equals the single-device
`moe.grouped_experts` to float32 rounding; each device then receives Z*m rows of which m on
average are real. With a capacity factor cf: Y = ceil(cf * m / Z) (cf = 1 fits a perfectly
balanced router), rows beyond C are dropped and counted (valid tokens only; padding rows are not
sent at all in this mode). `jax.lax.ragged_all_to_all` would send only the real rows but is not
implemented by XLA:CPU in jax 0.10 (UNIMPLEMENTED: ragged-all-to-all), so the dense
`jax.lax.all_to_all` is used on every backend.

With Z = 1 (no `expert` axis) the same code is the replicated-experts MoE: no all-to-all, each
device runs every expert on its own tokens.

Mode selection (`resolve_mode`): "local" = the single-device grouped matmul left to sharding
propagation, which replicates the global sort and hence all routed-expert work on every device
(see bench/RESULTS.md): only for one device; "all_to_all" = this file, or an error when the
shapes do not divide; "auto" = this file whenever a mesh of more than one device is set
(`jax.set_mesh`), else local. Under "auto", experts that do not divide over the `expert` axis
are an error (the trainer refuses such a config up front; replicating every expert on every
device is not a fallback to take silently); tokens that do not divide over the batch axes
(generation with a few rows) run the local path, said once in the log. The mode and capacity
factor come from the MoE module's `runtime` (`runtime.moe_dispatch`, `moe_capacity_factor`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen35_jax import sharding
from qwen35_jax.layers.mlp import grouped_swiglu
from qwen35_jax.runtime import MOE_DISPATCH_CHOICES

MODES = MOE_DISPATCH_CHOICES  # "auto" | "local" | "all_to_all"


@functools.cache
def _log_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


# ---------------------------------------------------------------------------------- layouts

TOKENS = ("batch", "length")
WEIGHT_IN = ("experts", "embed", "mlp")  # gate_proj, up_proj [E, D, I]
WEIGHT_OUT = ("experts", "mlp", "embed")  # down_proj [E, I, D]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where everything lives on the current mesh (all from the sharding table)."""

    mesh: jax.sharding.AbstractMesh
    token_spec: P  # [B, T]
    in_spec: P  # [E, D, I]
    out_spec: P  # [E, I, D]
    ep_axes: tuple[str, ...]  # experts split over
    gather_in: tuple[str, ...]  # D axis of [E, D, I] split over (all-gathered)
    gather_out: tuple[str, ...]  # D axis of [E, I, D]
    tp_axes: tuple[str, ...]  # I axis split over (partial sums -> psum)
    token_axes: tuple[str, ...]  # tokens split over (for the dropped-row count)

    @property
    def ep_size(self) -> int:
        return _prod(self.mesh, self.ep_axes)


def _entry(spec: P, i: int) -> tuple[str, ...]:
    e = spec[i] if i < len(spec) else None
    return () if e is None else (e,) if isinstance(e, str) else tuple(e)


def _prod(mesh, axes: tuple[str, ...]) -> int:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return math.prod(sizes[a] for a in axes)


def _layout(mesh, b: int, t: int, w_in_shape, w_out_shape) -> _Layout:
    token_spec = sharding.logical_spec(TOKENS, (b, t), mesh)
    in_spec = sharding.logical_spec(WEIGHT_IN, w_in_shape, mesh)
    out_spec = sharding.logical_spec(WEIGHT_OUT, w_out_shape, mesh)
    if _entry(in_spec, 0) != _entry(out_spec, 0) or _entry(in_spec, 2) != _entry(out_spec, 1):
        raise ValueError(f"expert weight layouts disagree: {in_spec} vs {out_spec}")
    return _Layout(
        mesh=mesh,
        token_spec=token_spec,
        in_spec=in_spec,
        out_spec=out_spec,
        ep_axes=_entry(in_spec, 0),
        gather_in=_entry(in_spec, 1),
        gather_out=_entry(out_spec, 2),
        tp_axes=_entry(in_spec, 2),
        token_axes=_entry(token_spec, 0) + _entry(token_spec, 1),
    )


def resolve_mode(mode: str, b: int, t: int, w_in_shape, w_out_shape) -> _Layout | None:
    """The layout for expert-parallel dispatch, or None for the local grouped matmul."""
    if mode not in MODES:
        raise ValueError(f"moe dispatch mode={mode!r} must be one of {MODES}")
    if mode == "local":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        if mode == "all_to_all":
            raise ValueError("moe dispatch 'all_to_all' needs a mesh: use jax.set_mesh(mesh)")
        return None
    layout = _layout(mesh, b, t, w_in_shape, w_out_shape)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    ep_wanted = math.prod(sizes.get(a, 1) for a in sharding.mesh_axes_of("experts"))
    tokens_wanted = sharding.logical_spec(TOKENS, None, mesh)
    if mode == "auto" and math.prod(sizes.values()) == 1:
        return None  # one device
    if layout.ep_size != ep_wanted:
        raise ValueError(
            f"moe dispatch {mode!r}: {w_in_shape[0]} experts do not divide over the mesh axes "
            f"{sharding.mesh_axes_of('experts')} of size {ep_wanted}"
        )
    if layout.token_spec != tokens_wanted:
        if mode == "auto":
            _log_once(
                f"MoE dispatch 'auto': tokens [B={b}, T={t}] do not divide over the mesh as "
                f"{tokens_wanted}; running the local (replicated) path"
            )
            return None
        raise ValueError(
            f"moe dispatch 'all_to_all': tokens [B={b}, T={t}] do not divide over the mesh "
            f"as {tokens_wanted} (got {layout.token_spec})"
        )
    return layout


# ---------------------------------------------------------------------------- the dispatch


def _local_dispatch(
    x_BTD, weights_BTk, experts_BTk, valid_BT, wg, wu, wd, *, lay: _Layout, capacity_factor
):
    """One device's part (inside shard_map): send, compute, return, combine."""
    b, t, d = x_BTD.shape
    k = experts_BTk.shape[-1]
    n, m, p = b * t, b * t * k, lay.ep_size
    if lay.gather_in:
        wg = jax.lax.all_gather(wg, lay.gather_in, axis=1, tiled=True)
        wu = jax.lax.all_gather(wu, lay.gather_in, axis=1, tiled=True)
    if lay.gather_out:
        wd = jax.lax.all_gather(wd, lay.gather_out, axis=2, tiled=True)
    e_local = wg.shape[0]
    cap = m if not capacity_factor else min(m, math.ceil(capacity_factor * m / p))

    x_AD = x_BTD.reshape(n, d)
    e_M = experts_BTk.reshape(m)
    target_M = e_M // e_local
    send_M = jnp.ones((m,), bool)
    if capacity_factor:
        send_M = jnp.repeat(valid_BT.reshape(n), k)  # padding rows take no capacity
    onehot_MZ = (target_M[:, None] == jnp.arange(p)[None, :]) & send_M[:, None]
    slot_M = jnp.take_along_axis(jnp.cumsum(onehot_MZ, axis=0), target_M[:, None], axis=1)[:, 0]
    slot_M = slot_M - 1
    sent_M = send_M & (slot_M < cap)
    dest_M = jnp.where(sent_M, target_M * cap + slot_M, p * cap)  # out of range: not written

    send_RD = (
        jnp.zeros((p * cap, d), x_AD.dtype)
        .at[dest_M]
        .set(jnp.repeat(x_AD, k, axis=0), mode="drop", unique_indices=True)
    )
    send_eR = (
        jnp.full((p * cap,), e_local, jnp.int32)
        .at[dest_M]
        .set((e_M % e_local).astype(jnp.int32), mode="drop", unique_indices=True)
    )

    def exchange(a):  # [p * cap, ...] by target -> by source (and back: the same op)
        if p == 1:
            return a
        a = a.reshape(p, cap, *a.shape[1:])
        a = jax.lax.all_to_all(a, lay.ep_axes, 0, 0, tiled=False)
        return a.reshape(p * cap, *a.shape[2:])

    out_RD = grouped_swiglu(exchange(send_RD), exchange(send_eR), wg, wu, wd)
    back_RD = exchange(out_RD)
    y_MD = jnp.take(back_RD, jnp.minimum(dest_M, p * cap - 1), axis=0)
    w_M = weights_BTk.reshape(m).astype(y_MD.dtype)
    y_MD = jnp.where(sent_M[:, None], y_MD * w_M[:, None], 0)
    y_AD = jnp.sum(y_MD.reshape(n, k, d), axis=1)
    if lay.tp_axes:
        y_AD = jax.lax.psum(y_AD, lay.tp_axes)
    dropped = jnp.sum((jnp.repeat(valid_BT.reshape(n), k) & ~sent_M).astype(jnp.float32))
    if lay.token_axes:
        dropped = jax.lax.psum(dropped, lay.token_axes)
    return y_AD.reshape(b, t, d), dropped


def expert_parallel(
    x_BTD: jax.Array,
    weights_BTk: jax.Array,
    experts_BTk: jax.Array,
    valid_BT: jax.Array,
    wg_EDI: jax.Array,
    wu_EDI: jax.Array,
    wd_EID: jax.Array,
    layout: _Layout,
    capacity_factor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """sum_k w * expert(x) with all-to-all dispatch; returns (y_BTD, dropped rows scalar)."""
    lay = layout
    if wg_EDI.shape[0] % lay.ep_size:
        raise ValueError(f"{wg_EDI.shape[0]} experts do not divide over {lay.ep_axes}")
    tok3 = P(*_pad(lay.token_spec, 2), None)
    fn = jax.shard_map(
        lambda *a: _local_dispatch(*a, lay=lay, capacity_factor=capacity_factor),
        mesh=lay.mesh,
        in_specs=(
            tok3,
            tok3,
            tok3,
            _pad(lay.token_spec, 2),
            lay.in_spec,
            lay.in_spec,
            lay.out_spec,
        ),
        out_specs=(tok3, P()),
    )
    return fn(x_BTD, weights_BTk, experts_BTk, valid_BT, wg_EDI, wu_EDI, wd_EID)


def _pad(spec: P, n: int) -> P:
    return P(*spec, *([None] * (n - len(spec))))
