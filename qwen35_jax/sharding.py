"""Logical axis names and the one table that maps them to mesh axes.

Modules never name mesh axes. Every parameter is created with logical axis names
(`nn.with_logical_partitioning`) and the main activations are constrained with
`nn.with_logical_constraint`; this table resolves those names to the mesh axes
`data`, `fsdp`, `tensor`, `expert`, `sequence`. A size-1 mesh axis costs nothing, so the same
table serves a laptop and a pod; changing the parallelism is a change of mesh shape only.

Logical names:
  batch, length            activations: batch rows, sequence positions
  activation_embed         the hidden (D) axis of activations (replicated)
  vocab, embed             embedding / LM head; `embed` is the D axis of every weight
  heads, kv_heads, head_dim            attention and Gated DeltaNet heads and their dims
  mlp                      FFN hidden width (dense, shared expert, routed expert)
  experts                  the expert axis of MoE weights
  layers, sublayers        the stacked-layer axes added by the scans (never sharded)
  conv, norm, router       conv taps, norm scales, the router's expert axis (replicated)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert", "sequence")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("layers", None),
    ("sublayers", None),
    ("conv", None),
    ("norm", None),
    ("router", None),
)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    expert: int = 1,
    sequence: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all). One size may be -1: the rest of the devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert, "sequence": sequence}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices not divisible by {sizes}")
        sizes[free[0]] = len(devices) // known
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh: sizes {sizes} use {total} devices, {len(devices)} are present")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return jax.sharding.Mesh(grid, MESH_AXES)


def logical_to_mesh_sharding(abstract_boxed_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a tree of `nn.Partitioned` leaves (e.g. `jax.eval_shape` of init)."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def axis_rules():
    """Context manager that activates the table for `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(LOGICAL_RULES)
