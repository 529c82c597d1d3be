"""The on-disk layout of a converted (`hf-to-orbax`) checkpoint, shared by both directions.

    <out>/config.json     the source config.json
    <out>/convert.json    FORMAT, leaf paths and dtypes, source layout, source tensor dtypes
    <out>/params/         a plain orbax PyTree checkpoint (zarr v2, no OCDBT): one tensorstore
                          zarr array per leaf at `params/<a.b.c>`, plus orbax's metadata files
    <out>/<SIDE_FILES>    tokenizer and generation files of the source, when present

Leaves are addressed by their path in the parameter tree (`Path`, e.g. ("blocks", "linear_layers",
"mlp", "gate_proj", "kernel")). `leaf_store` opens or creates one leaf's zarr array with chunks of
one stacked entry (layer, expert), at most 64 MiB, and never larger than one device's shard on a
target mesh (`shard_shapes`). Outputs are written into `atomic_dir(out)` and renamed by `finish`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn

from qwen35_jax.config import Qwen35Config
from qwen35_jax.convert.hf import CheckpointError
from qwen35_jax.model import abstract_params

FORMAT = "qwen35_jax.orbax.v1"
CHUNK_BYTES = 64 << 20

Path = tuple[str, ...]


def get_leaf(tree: dict, path: Path) -> Any:
    """`tree[path[0]][path[1]]...`."""
    for name in path:
        tree = tree[name]
    return tree


def set_leaf(tree: dict, path: Path, value: Any) -> None:
    """Sets `tree[path[0]]...[path[-1]] = value`, creating the intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def leaf_shapes(config: Qwen35Config) -> dict[Path, jax.ShapeDtypeStruct]:
    """{leaf path: ShapeDtypeStruct} of the parameter tree of `config`."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(config)))[0]
    return {tuple(k.key for k in kp): s for kp, s in flat}


def shard_shapes(config: Qwen35Config, mesh: Mapping[str, int]) -> dict[Path, tuple[int, ...]]:
    """{leaf path: the shape of one device's shard} under the sharding table on a mesh of these
    axis sizes (`sharding.parse_mesh` form; dcn_<axis> factors multiply their axis)."""
    from qwen35_jax import sharding  # noqa: PLC0415

    sizes = {a: int(mesh.get(a, 1)) * int(mesh.get(f"dcn_{a}", 1)) for a in sharding.MESH_AXES}
    bad = {k: v for k, v in mesh.items() if int(v) < 1}
    if bad:
        raise ValueError(f"--mesh sizes must be explicit positive integers here, got {bad}")
    boxed = jax.tree_util.tree_flatten_with_path(
        abstract_params(config), is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    out = {}
    for kp, box in boxed:
        spec = sharding.logical_spec(box.names, box.value.shape, sizes)
        shard = []
        for dim, axes in zip(box.value.shape, tuple(spec) + (None,) * len(box.names), strict=False):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            shard.append(dim // int(np.prod([sizes[a] for a in axes], dtype=np.int64)))
        out[tuple(k.key for k in kp)] = tuple(shard)
    return out


def leaf_store(
    params_dir: str,
    path: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    n_index: int,
    create: bool,
    shard: tuple[int, ...] | None = None,
) -> Any:
    """A tensorstore zarr array (`ts.TensorStore`) at the place orbax (no OCDBT) keeps leaf `path`.

    Chunks are one entry of the stacked (leading) axes, so each Hugging Face tensor fills whole
    chunks (no read-modify-write), split further along the next axis to stay under 64 MiB. With
    `shard` (one device's shard shape on a target mesh) no chunk is larger than a shard, so every
    chunk belongs to exactly one device's shard and a sharded restore reads only its own chunks.
    """
    import tensorstore as ts

    directory = os.path.join(params_dir, ".".join(path))
    if not create:
        return ts.open(
            {"driver": "zarr", "kvstore": {"driver": "file", "path": directory}}
        ).result()
    chunks = [1] * n_index + list(shape[n_index:])
    if shard is not None:
        chunks = [min(c, s) for c, s in zip(chunks, shard, strict=True)]
    rest = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
    if len(chunks) > n_index and rest > CHUNK_BYTES:
        k = -(-rest // CHUNK_BYTES)
        chunks[n_index] = max(1, -(-chunks[n_index] // k))
    zdtype = "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.str
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": directory},
        "metadata": {
            "shape": list(shape),
            "chunks": [max(1, c) for c in chunks],
            "dtype": zdtype,
            "compressor": {"id": "zstd", "level": 1},
            "fill_value": None,
            "order": "C",
            "dimension_separator": ".",
            "filters": None,
        },
    }
    return ts.open(spec, create=True).result()


def write_orbax_metadata(params_dir: str, paths: list[Path]) -> None:
    """The files that make `params_dir` an orbax PyTree checkpoint (zarr v2, no OCDBT)."""
    tree = {
        str(p): {
            "key_metadata": [{"key": k, "key_type": 2} for k in p],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
        for p in paths
    }
    meta = {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    with open(os.path.join(params_dir, "_METADATA"), "w") as f:
        json.dump(meta, f)
    now = time.time_ns()
    ckpt_meta = {
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
        "PyTreeCheckpointHandler",
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    with open(os.path.join(params_dir, "_CHECKPOINT_METADATA"), "w") as f:
        json.dump(ckpt_meta, f)
    with open(os.path.join(params_dir, "commit_success.txt"), "w") as f:
        f.write("Checkpoint commit was successful.")


def atomic_dir(out: str) -> str:
    """A fresh `<out>.tmp-<pid>-XXXX` beside `out` to write into (refuses an existing `out`).

    Leftovers `<out>.tmp-<pid>-*` of converters that died (SIGKILL, power loss: the process
    `pid` no longer exists) are removed first, with one line on stderr each."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(out)
    return tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.tmp-{os.getpid()}-", dir=parent)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A temporary without a process id in its name (`<out>.tmp-XXXX`, converters before the pid was
# added) is removed once nothing in it has changed for this long; a younger one may belong to a
# conversion still running and is only named.
UNNAMED_STALE_AFTER_S = 600.0


def _newest_mtime(path: str) -> float:
    newest = os.path.getmtime(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.path.getmtime(os.path.join(root, name)))
    return newest


def remove_stale_temporaries(out: str) -> list[str]:
    """Removes `<out>.tmp-<pid>-*` directories whose process is gone, and `<out>.tmp-XXXX` ones
    of older converters (no pid) untouched for `UNNAMED_STALE_AFTER_S`; returns their paths.
    One line on stderr per directory removed or left (a recent one without a pid)."""
    parent, base = os.path.dirname(out), os.path.basename(out) + ".tmp-"
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(base) or not os.path.isdir(path):
            continue
        pid, sep, _ = name[len(base) :].partition("-")
        if sep and pid.isdigit():
            if int(pid) == os.getpid() or process_alive(int(pid)):
                continue
            why = f"left by converter process {pid}, which is gone"
        else:
            idle = time.time() - _newest_mtime(path)
            if idle < UNNAMED_STALE_AFTER_S:
                sys.stderr.write(
                    f"left {path}: a temporary of an older converter (no process id in its "
                    f"name), changed {idle:.0f}s ago; remove it by hand once no conversion runs\n"
                )
                continue
            why = f"left by an older converter, unchanged for {idle / 60:.0f} min"
        shutil.rmtree(path, ignore_errors=True)
        sys.stderr.write(f"removed {path}: {why}\n")
        removed.append(path)
    return removed


def finish(tmp: str, out: str) -> None:
    """Publishes a completed `atomic_dir` as `out` (one rename)."""
    os.rename(tmp, os.path.abspath(out))


# Copied along both ways, when present: the tokenizer and generation settings travel with the
# weights (the trainer tokenizes a continued run with the checkpoint's tokenizer.json).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


def copy_side_files(src: str | os.PathLike, dst: str) -> None:
    """Copies the `SIDE_FILES` that `src` has into `dst`."""
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a `hf_to_orbax` output (as opposed to a trainer checkpoint)."""
    return os.path.isfile(os.path.join(path, "convert.json"))


def read_meta(ckpt_dir: str) -> dict:
    """convert.json of a converted checkpoint (CheckpointError if absent or of another format)."""
    path = os.path.join(ckpt_dir, "convert.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{ckpt_dir}: no convert.json: not written by hf-to-orbax")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta
