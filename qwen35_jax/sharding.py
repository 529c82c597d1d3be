"""The device mesh, the one table from logical axis names to mesh axes, and per-host batches.

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

Resolution (`logical_spec`): each array dimension takes the mesh axes its name maps to, in
order, skipping a mesh axis that is absent, of size 1, already used by an earlier dimension of
the same array, or that would make the dimension indivisible (e.g. 2 key/value heads on
tensor=4 stay replicated). So routed-expert weights [experts, embed, mlp] go to
(expert, fsdp, tensor), while every other weight's `embed` axis is split over fsdp x expert:
the expert ranks see different tokens, so for non-expert weights they are more FSDP ranks.
Optimizer state and gradients have the parameters' boxes, hence the parameters' shardings
(`logical_to_mesh_sharding` accepts any tree with `nn.Partitioned` leaves; other leaves are
replicated).

Mesh (`make_mesh`, `mesh_from_config`): sizes per axis, one of them may be -1 (the rest of the
devices). Multi-slice TPU pods and multi-node GPU clusters add data-centre-network factors
`dcn_<axis>`: the mesh axis then has size `<axis> * dcn_<axis>`, with the `dcn_` factor
outermost across granules: TPU slices (`slice_index`, via
`jax.experimental.mesh_utils.create_hybrid_device_mesh`) or, elsewhere, equal runs of consecutive
processes (GPU nodes, whether one process per GPU or per node); within a granule the axes are
laid out by `create_device_mesh` (physical-torus aware on TPU).

Multi-host: `initialize_distributed` joins the processes (explicit environment, SLURM, Cloud
TPU auto-detection); each process loads only the rows of the global batch that its devices hold
(`process_batch_slice`) and `make_global_batch` assembles the global arrays from those pieces.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert", "sequence")

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


# ----------------------------------------------------------------------------------- the mesh


def resolve_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Per-axis sizes with the one -1 replaced by the rest of `num_devices`; checked."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    bad = {a: v for a, v in sizes.items() if v == 0 or v < -1}
    if bad:
        raise ValueError(f"mesh: sizes must be >= 1 or -1, got {bad}")
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices not divisible by {sizes}")
        sizes[free[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(f"mesh: sizes {sizes} use {total} devices, {num_devices} are present")
    return sizes


def device_grid(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
) -> np.ndarray:
    """The devices arranged as [data, fsdp, tensor, expert, sequence] (see the module doc).

    `ici`: sizes within a slice (one may be -1); `dcn`: factors across slices or processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}
    if any(v < 1 for v in dcn_sizes.values()):
        raise ValueError(f"mesh: dcn sizes must be >= 1, got {dcn_sizes}")
    num_granules = math.prod(dcn_sizes.values())
    if len(devices) % num_granules:
        raise ValueError(f"mesh: {len(devices)} devices not divisible by dcn {dcn_sizes}")
    ici_sizes = resolve_sizes(ici, len(devices) // num_granules)
    ici_shape = [ici_sizes[a] for a in MESH_AXES]
    dcn_shape = [dcn_sizes[a] for a in MESH_AXES]
    if num_granules == 1:
        return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == num_granules:  # TPU multi-slice
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, allow_split_physical_axes=True
        )
    # GPU nodes (or CPU hosts): granule = a run of consecutive processes, so one process per
    # GPU and one per node both work; the same block layout as create_hybrid_device_mesh.
    processes = sorted({d.process_index for d in devices})
    if len(processes) % num_granules:
        raise ValueError(f"mesh: {len(processes)} processes do not split into dcn {dcn_sizes}")
    rank = {p: i * num_granules // len(processes) for i, p in enumerate(processes)}
    granules: list[list[Any]] = [[] for _ in range(num_granules)]
    for d in devices:
        granules[rank[d.process_index]].append(d)
    blocks = np.empty(dcn_shape, dtype=object)
    for i, index in enumerate(np.ndindex(*dcn_shape)):
        blocks[index] = mesh_utils.create_device_mesh(
            ici_shape, granules[i], allow_split_physical_axes=True
        )
    return np.block(blocks.tolist())


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    expert: int = 1,
    sequence: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn: Mapping[str, int] | None = None,
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all). One size may be -1: the rest of the devices.

    With `dcn` (e.g. {"data": 2} for two slices) the sizes above are per slice and each mesh
    axis has size `size * dcn[axis]`.
    """
    ici = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert, "sequence": sequence}
    return jax.sharding.Mesh(device_grid(ici, dcn, devices), MESH_AXES)


def _field(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def mesh_from_config(cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh of a config section with fields data, fsdp, tensor, expert, sequence (absent: 1;
    all absent: fsdp=-1) and optional dcn_data, ..., dcn_sequence. A dict, an ml_collections
    ConfigDict or any object with those attributes."""
    ici = {a: _field(cfg, a, None) for a in MESH_AXES}
    if all(v is None for v in ici.values()):
        ici["fsdp"] = -1
    ici = {a: 1 if v is None else int(v) for a, v in ici.items()}
    dcn = {a: int(_field(cfg, f"dcn_{a}", 1) or 1) for a in MESH_AXES}
    return make_mesh(**ici, devices=devices, dcn=dcn)


def parse_mesh(text: str) -> dict[str, int]:
    """ "fsdp=64,expert=8" -> {"fsdp": 64, "expert": 8} (keys: the axes and dcn_<axis>)."""
    valid = set(MESH_AXES) | {f"dcn_{a}" for a in MESH_AXES}
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in valid:
            raise ValueError(f"mesh: bad entry {part!r} in {text!r}; keys: {sorted(valid)}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise ValueError(
                f"mesh: {key.strip()}={value!r} is not an integer in {text!r}"
            ) from None
    return out


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh) -> Iterator[jax.sharding.Mesh]:
    """`jax.set_mesh(mesh)` and the logical-axis table, together (trace model code inside)."""
    with jax.set_mesh(mesh), axis_rules():
        yield mesh


def axis_rules():
    """Context manager that activates the table for `nn.with_logical_constraint`."""
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


def activation_sharding(names: Sequence[str | None], mesh: jax.sharding.Mesh) -> NamedSharding:
    """The NamedSharding of an activation with these logical names (no divisibility check)."""
    return NamedSharding(mesh, logical_spec(names, None, mesh))


# --------------------------------------------------------------------------------- multi-host


def initialize_distributed() -> bool:
    """Join the other processes of this job, if there are any; True when distributed.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (as `launch/local.sh`
    sets them). Auto-detected by `jax.distributed.initialize()`: a SLURM job step of several
    tasks, or anything when QWEN35_DISTRIBUTED=1 (`launch/tpu_pod.sh` sets it: Cloud TPU
    metadata). On CPU the collectives go through gloo. Call it before anything touches the
    devices.
    """
    env = os.environ
    explicit = int(env.get("JAX_NUM_PROCESSES", "1")) > 1
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    forced = env.get("QWEN35_DISTRIBUTED", "") == "1"
    if not (explicit or slurm or forced):
        return False
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the batch rows are split over."""
    return tuple(a for a in mesh_axes_of("batch") if _axis_sizes(mesh).get(a, 1) > 1)


def batch_sharding(mesh: jax.sharding.Mesh, global_batch: int | None = None) -> NamedSharding:
    """Input arrays [B, ...]: rows split over the batch axes, the rest replicated (the model's
    first activation constraint then splits the length over `sequence`)."""
    shape = None if global_batch is None else (global_batch,)
    return NamedSharding(mesh, logical_spec(("batch",), shape, mesh))


def process_batch_slice(mesh: jax.sharding.Mesh, global_batch: int) -> slice:
    """The rows of the global batch that this process loads (those its devices hold)."""
    sharding = batch_sharding(mesh, global_batch)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows {starts}; "
            "order the mesh so that batch axes are outermost across processes"
        )
    return slice(lo, hi)


def make_global_batch(local_tree: Any, mesh: jax.sharding.Mesh, global_batch_size: int) -> Any:
    """Global arrays [global_batch, ...] from each process's rows (`process_batch_slice`)."""
    sharding = batch_sharding(mesh, global_batch_size)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding, x, (global_batch_size, *x.shape[1:])
        )

    return jax.tree.map(one, local_tree)
