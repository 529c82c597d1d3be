"""The one table from logical axis names to mesh axes, and its resolution.

Modules never name mesh axes. Every parameter is created with logical axis names
(`nn.with_logical_partitioning`) and the main activations are constrained with `constrain`; this
table resolves those names to the mesh axes `data`, `fsdp`, `tensor`, `expert`, `sequence`
(mesh.py builds the mesh). A size-1 mesh axis costs nothing, so the same table serves a laptop
and a pod; changing the parallelism is a change of mesh shape only.

Logical names:
  batch, length            activations: batch rows, sequence positions
  activation_embed         the hidden (D) axis of activations (replicated)
  vocab, embed             embedding / LM head; `embed` is the D axis of every weight
  heads, kv_heads, head_dim            attention and Gated DeltaNet heads and their dims
  mlp                      FFN hidden width (dense, shared expert, routed expert)
  experts                  the expert axis of MoE weights
  layers, sublayers        the stacked-layer axes added by the scans (never sharded)
  conv, norm, router       conv taps, norm scales, the router's expert axis (replicated)

Resolution (`logical_spec`, the one function for parameters, activations and inputs): each array
dimension takes the mesh axes its name maps to, in order, skipping a mesh axis that is absent, of
size 1, already used by an earlier dimension of the same array, or that would make the dimension
indivisible (e.g. 2 key/value heads on tensor=4 stay replicated). So routed-expert weights
[experts, embed, mlp] go to (expert, fsdp, tensor), while every other weight's `embed` axis is
split over fsdp x expert: the expert ranks see different tokens, so for non-expert weights they
are more FSDP ranks. Optimizer state and gradients have the parameters' boxes, hence the
parameters' shardings (`logical_to_mesh_sharding` accepts any tree with `nn.Partitioned` leaves;
other leaves are replicated). Batch inputs: rows over the mesh axes of `batch`
(`batch_sharding`); multi-process helpers are in distributed.py.

The mesh names (`MESH_AXES`, `make_mesh`, `mesh_from_config`, `parse_mesh`, ...) are re-exported
from mesh.py, so `from qwen35_jax import sharding` still reaches them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen35_jax.mesh import (  # noqa: F401 - re-exported: the mesh half of the old module
    MESH_AXES,
    device_grid,
    make_mesh,
    mesh_from_config,
    mesh_sizes,
    parse_mesh,
    resolve_sizes,
)

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated). Rules are tried in
# order; a name may have fallbacks (flax semantics: a rule applies only if none of its mesh axes
# is taken by another dimension of the same array).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("activation_embed", None),
    ("experts", "expert"),  # before embed: routed-expert weights take `expert` for E
    ("embed", ("fsdp", "expert")),  # expert ranks hold distinct tokens: FSDP for the rest
    ("embed", "fsdp"),  # ... and for the D axis of routed-expert weights
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("sublayers", None),
    ("conv", None),
    ("norm", None),
    ("router", None),
)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
    """`jax.set_mesh(mesh)` and the logical-axis table, together (trace model code inside)."""
    with jax.set_mesh(mesh), axis_rules():
        yield mesh


def axis_rules():
    """Context manager that activates the table for flax's `nn.with_logical_constraint` (kept
    for code outside this package; the model itself uses `constrain`)."""
    return nn.logical_axis_rules(LOGICAL_RULES)


# ------------------------------------------------------------------ logical names -> mesh axes


def _axis_sizes(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | Mapping[str, int]):
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def _as_axes(axes: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axes_of(name: str | None) -> tuple[str, ...]:
    """The mesh axes of a logical name's first rule (before resolution)."""
    if name is None:
        return ()
    for rule_name, axes in LOGICAL_RULES:
        if rule_name == name:
            return _as_axes(axes)
    raise KeyError(f"logical axis {name!r} is not in sharding.LOGICAL_RULES")


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | Mapping[str, int],
) -> P:
    """The PartitionSpec of an array with these logical axis names on `mesh` (module doc).

    Rules are applied in table order as flax does (`nn.logical_to_mesh_axes`), after dropping
    mesh axes that are absent or of size 1; then, per dimension, an axis that would make the
    dimension indivisible is skipped. `shape=None` skips that check (activations).
    """
    sizes = _axis_sizes(mesh)
    for name in names:
        if name is not None:
            mesh_axes_of(name)  # raises for an unknown name
    assigned: list[tuple[str, ...] | None] = [None] * len(names)
    used: set[str] = set()
    for rule_name, rule_axes in LOGICAL_RULES:
        if rule_name not in names:
            continue
        i = list(names).index(rule_name)
        live = [a for a in _as_axes(rule_axes) if sizes.get(a, 1) > 1]
        if assigned[i] is not None or any(a in used for a in live):
            continue
        kept, prod = [], 1
        for axis in live:
            if shape is not None and int(shape[i]) % (prod * sizes[axis]):
                continue
            kept.append(axis)
            prod *= sizes[axis]
        assigned[i] = tuple(kept)
        used.update(kept)
    spec = [None if not a else a[0] if len(a) == 1 else a for a in assigned]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def partition_specs(abstract_tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """PartitionSpecs for a tree whose leaves are `nn.Partitioned` boxes (others: P())."""

    def one(leaf):
        if _is_box(leaf):
            return logical_spec(leaf.names, np.shape(leaf.value), mesh)
        return P()

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def logical_to_mesh_sharding(abstract_boxed_tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a tree of `nn.Partitioned` leaves (e.g. `jax.eval_shape` of init,
    or of an optax init over boxed parameters: the moments then follow the parameters)."""
    specs = partition_specs(abstract_boxed_tree, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding of these logical names on the current mesh
    (`jax.set_mesh`), resolved by `logical_spec` as parameters are; unchanged without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def activation_sharding(names: Sequence[str | None], mesh: jax.sharding.Mesh) -> NamedSharding:
    """The NamedSharding of an activation with these logical names (no divisibility check)."""
    return NamedSharding(mesh, logical_spec(names, None, mesh))


# ------------------------------------------------------------------------------ batch inputs


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the batch rows are split over."""
    return tuple(a for a in mesh_axes_of("batch") if _axis_sizes(mesh).get(a, 1) > 1)


def batch_sharding(mesh: jax.sharding.Mesh, global_batch: int | None = None) -> NamedSharding:
    """Input arrays [B, ...]: rows split over the batch axes, the rest replicated (the model's
    first activation constraint then splits the length over `sequence`)."""
    shape = None if global_batch is None else (global_batch,)
    return NamedSharding(mesh, logical_spec(("batch",), shape, mesh))
