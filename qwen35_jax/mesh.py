"""The device mesh: five named axes, their sizes from a config, and the devices laid out on them.

    MESH_AXES = (data, fsdp, tensor, expert, sequence)

Sizes per axis; one of them may be -1 (the rest of the devices). Multi-slice TPU pods and
multi-node GPU clusters add data-centre-network factors `dcn_<axis>`: the mesh axis then has size
`<axis> * dcn_<axis>`, with the `dcn_` factor outermost across granules: TPU slices
(`slice_index`, via `jax.experimental.mesh_utils.create_hybrid_device_mesh`) or, elsewhere, equal
runs of consecutive processes (GPU nodes, whether one process per GPU or per node); within a
granule the axes are laid out by `create_device_mesh` (physical-torus aware on TPU).

`mesh_sizes` is the one place that checks sizes against a device count: `make_mesh` uses it, and
so does the config validation before any device is touched (train/config_schema.py).
What each axis shards is the logical-axis table's business (sharding.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert", "sequence")


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


def dcn_sizes(dcn: Mapping[str, int] | None) -> dict[str, int]:
    """The dcn factor of every axis (absent: 1), checked >= 1."""
    sizes = {a: int((dcn or {}).get(a, 1) or 1) for a in MESH_AXES}
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"mesh: dcn sizes must be >= 1, got {sizes}")
    return sizes


def mesh_sizes(
    ici: Mapping[str, int], dcn: Mapping[str, int] | None, num_devices: int
) -> dict[str, int]:
    """The full size of every mesh axis (`ici` size x dcn factor) on `num_devices` devices;
    ValueError when they do not fit."""
    dcn = dcn_sizes(dcn)
    granules = math.prod(dcn.values())
    if num_devices % granules:
        raise ValueError(f"mesh: {num_devices} devices not divisible by dcn {dcn}")
    ici = resolve_sizes(ici, num_devices // granules)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def device_grid(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
) -> np.ndarray:
    """The devices arranged as [data, fsdp, tensor, expert, sequence] (see the module doc).

    `ici`: sizes within a slice (one may be -1); `dcn`: factors across slices or processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_factors = dcn_sizes(dcn)
    num_granules = math.prod(dcn_factors.values())
    mesh_sizes(ici, dcn_factors, len(devices))  # checks
    ici_sizes = resolve_sizes(ici, len(devices) // num_granules)
    ici_shape = [ici_sizes[a] for a in MESH_AXES]
    dcn_shape = [dcn_factors[a] for a in MESH_AXES]
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
        raise ValueError(f"mesh: {len(processes)} processes do not split into dcn {dcn_factors}")
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


def config_sizes(cfg: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(ici sizes, dcn factors) of a config section with fields data, fsdp, tensor, expert,
    sequence (absent: 1; all absent: fsdp=-1) and optional dcn_data, ..., dcn_sequence. A dict,
    an ml_collections ConfigDict or any object with those attributes."""
    ici = {a: _field(cfg, a, None) for a in MESH_AXES}
    if all(v is None for v in ici.values()):
        ici["fsdp"] = -1
    ici = {a: 1 if v is None else int(v) for a, v in ici.items()}
    dcn = {a: int(_field(cfg, f"dcn_{a}", 1) or 1) for a in MESH_AXES}
    return ici, dcn


def mesh_from_config(cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh of a config section (`config_sizes`) over `devices` (default: all)."""
    ici, dcn = config_sizes(cfg)
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
