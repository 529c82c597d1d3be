"""Streaming conversion between Hugging Face safetensors checkpoints and orbax checkpoints.

hf -> orbax (`hf_to_orbax`): all shard headers are read first and checked against the name table
(`hf_names.hf_rules`): missing, unexpected and mis-shaped tensors and truncated shards are
reported together in one `CheckpointError` before anything is written. Then the shards are read
in file order, each tensor once (a positioned read, no memory map kept), split into its pieces
and each piece written straight into its slice of the stacked leaf on disk: every leaf is a
tensorstore zarr array chunked one stacked entry (layer, expert) at a time, laid out exactly as
orbax's PyTree handler writes it without OCDBT, plus orbax's metadata files. Host memory is about
one tensor (one expert matrix) plus the runtime, whatever the model size. Everything goes to
`<out>.tmp-XXXX`, renamed to `<out>` only when complete; any failure removes it.

Layout of the output directory::

    config.json    the source config.json (transformers and `config_from_hf` read it)
    tokenizer.json and the other `SIDE_FILES` of the source, when present (copied both ways)
    convert.json   format, leaf paths and dtypes, source layout (prefixes, fused experts) and
                   each source tensor's dtype (so the export writes the same dtypes)
    params/        a plain orbax PyTree checkpoint of the parameter tree (zarr v2, no OCDBT):
                   `ocp.PyTreeCheckpointer().restore(out + "/params")` works

orbax -> hf (`orbax_to_hf`): every Hugging Face tensor is rebuilt from its slices
(`Rule.join` of `Piece.to_hf`) in the source dtype and layout (fused or per-expert experts,
multimodal prefix, vision prefix) and written to safetensors shards of at most `max_shard_bytes`
with `model.safetensors.index.json`: memory about one output shard.

`restore_params(ckpt_dir, shardings)` gives (config, params) for the trainer, restoring each leaf
straight into its `NamedSharding` when shardings are given.

The directory layout, leaf addressing and chunking are in `orbax_layout.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwen35_jax.config import Qwen35Config
from qwen35_jax.convert.hf import (
    VISION_PREFIXES,
    CheckpointError,
    describe_problems,
    detect_layout,
    shard_files,
)
from qwen35_jax.convert.hf_names import Rule, hf_rules
from qwen35_jax.convert.orbax_layout import (
    FORMAT,
    SIDE_FILES,
    Path,
    atomic_dir,
    copy_side_files,
    finish,
    get_leaf,
    is_converted_checkpoint,
    leaf_shapes,
    leaf_store,
    read_meta,
    set_leaf,
    shard_shapes,
    write_orbax_metadata,
)
from qwen35_jax.convert.safetensors_io import (
    CODES,
    DTYPES,
    SafetensorsError,
    SafetensorsFile,
    write_safetensors,
)
from qwen35_jax.convert.vision_names import detect_prefix
from qwen35_jax.hf_config import from_hf as config_from_hf

DEFAULT_SHARD_BYTES = 2 * 10**9
RELEASE_BYTES = 16 << 20  # hand freed heap back to the OS after tensors this large


# ---------------------------------------------------------------- progress
class Progress:
    """One updating stderr line: tensors and bytes done, rate and ETA."""

    def __init__(self, what: str, tensors: int, nbytes: int, stream=None, every: float = 0.5):
        self.what, self.tensors, self.nbytes = what, tensors, nbytes
        self.done_t = self.done_b = 0
        self.start = self.last = time.monotonic()
        self.stream = sys.stderr if stream is None else stream
        self.every = every

    def update(self, tensors: int, nbytes: int) -> None:
        self.done_t += tensors
        self.done_b += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.done_t == self.tensors:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        dt = max(now - self.start, 1e-9)
        rate = self.done_b / dt
        left = (self.nbytes - self.done_b) / rate if rate > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
        self.stream.write(
            f"\r[{self.what}] {self.done_t}/{self.tensors} tensors, "
            f"{self.done_b / 1e6:.1f}/{self.nbytes / 1e6:.1f} MB, "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}   "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.done_t != self.tensors:
            self._show(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------- reading
def _read(st: SafetensorsFile, key: str) -> np.ndarray:
    """Copy one tensor out of a shard with a positioned read (no memory map kept)."""
    info = st.header[key]
    if info["dtype"] not in DTYPES:
        raise SafetensorsError(f"{st.path}: {key} has unsupported dtype {info['dtype']}")
    dtype = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    out = np.empty(count, dtype)
    with open(st.path, "rb") as f:
        f.seek(st.data_start + begin)
        n = f.readinto(out.view(np.uint8)) if count else 0
    if n != end - begin:
        raise SafetensorsError(
            f"{st.path}: truncated: tensor {key} needs bytes up to {st.data_start + end}, "
            f"the file has {st.size}"
        )
    return out.reshape(info["shape"])


def _check_extent(st: SafetensorsFile, key: str) -> str | None:
    info = st.header[key]
    if info["dtype"] not in DTYPES:
        return f"{st.path}: {key} has unsupported dtype {info['dtype']}"
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != count * DTYPES[info["dtype"]].itemsize:
        return f"{st.path}: {key}: byte length does not match its shape"
    if st.data_start + end > st.size:
        return (
            f"{st.path}: truncated: tensor {key} needs bytes up to {st.data_start + end}, "
            f"the file has {st.size}"
        )
    return None


def _release() -> None:
    """Return freed heap to the OS (glibc keeps tensorstore's per-thread arenas otherwise)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ckptr():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


# ---------------------------------------------------------------- hf -> orbax
def hf_to_orbax(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    progress: bool = True,
    mesh: Mapping[str, int] | None = None,
) -> str:
    """Convert a Hugging Face checkpoint directory into an orbax checkpoint at `out`.

    `dtype` ('bfloat16' or 'float32') casts every leaf; None keeps each tensor's own dtype.
    `mesh` (axis sizes, e.g. {"fsdp": 64, "expert": 8}) lays the chunks out for that mesh: no
    chunk spans two devices' shards (see `_leaf_store`); it is recorded in convert.json.
    Raises `CheckpointError` (all problems listed) or `ConfigError` before writing anything.
    """
    hf_dir, out = os.fspath(hf_dir), os.fspath(out)
    config = config_from_hf(hf_dir)
    files = shard_files(hf_dir)
    headers: dict[str, SafetensorsFile] = {}
    unreadable: list[str] = []
    for fname in files:
        try:
            headers[fname] = SafetensorsFile(fname)
        except SafetensorsError as e:
            unreadable.append(str(e))
    all_keys = [k for st in headers.values() for k in st.keys()]
    multimodal, fused = detect_layout(all_keys)
    with_vision = config.vision_config is not None
    vision_prefix = detect_prefix(all_keys) if with_vision else None
    rule_list = hf_rules(
        config, multimodal_prefix=multimodal, fused_experts=fused, vision_prefix=vision_prefix
    )
    rules = {r.key: r for r in rule_list}
    optional = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    problems: dict[str, list[str]] = {
        "missing": [],
        "unexpected": [],
        "wrong shape": [],
        "unreadable": unreadable,
    }
    where: dict[str, SafetensorsFile] = {}
    misshaped: set[str] = set()
    skipped: list[str] = []
    for fname, st in headers.items():
        base = os.path.basename(fname)
        for key in st.keys():
            if key in where:
                problems["unexpected"].append(f"{key} (duplicate, in {base})")
                continue
            rule = rules.get(key)
            if rule is None:
                if key in optional or (not with_vision and key.startswith(VISION_PREFIXES)):
                    skipped.append(key)
                else:
                    problems["unexpected"].append(f"{key} (in {base})")
                continue
            if st.shape(key) != rule.shape:
                found = f"found {st.shape(key)} in {base}"
                problems["wrong shape"].append(f"{key}: expected {rule.shape}, {found}")
                misshaped.add(key)
                continue
            bad = _check_extent(st, key)
            if bad:
                problems["unreadable"].append(bad)
                continue
            where[key] = st
    problems["missing"] = sorted(k for k in rules if k not in where and k not in misshaped)
    if any(problems.values()):
        raise CheckpointError(describe_problems(problems, hf_dir))

    shapes = leaf_shapes(config)
    src_dtypes = {k: where[k].header[k]["dtype"] for k in rules}
    leaf_dtype: dict[Path, np.dtype] = {}
    for r in rule_list:
        for pc in r.pieces:
            d = np.dtype(dtype) if dtype else DTYPES[src_dtypes[r.key]]
            prev = leaf_dtype.get(pc.path)
            leaf_dtype[pc.path] = d if prev is None else np.promote_types(prev, d)
    unfilled = sorted("/".join(p) for p in shapes if p not in leaf_dtype)
    if unfilled:
        raise CheckpointError(f"no Hugging Face tensor fills the leaves {unfilled}")
    n_index: dict[Path, int] = {pc.path: len(pc.index) for r in rule_list for pc in r.pieces}
    shards = shard_shapes(config, mesh) if mesh else {}

    total = sum(int(np.prod(rules[k].shape)) * DTYPES[src_dtypes[k]].itemsize for k in where)
    bar = Progress("hf-to-orbax", len(rules), total) if progress else None
    tmp = atomic_dir(out)
    try:
        params_dir = os.path.join(tmp, "params")
        os.makedirs(params_dir)
        stores = {
            p: leaf_store(
                params_dir, p, shapes[p].shape, leaf_dtype[p], n_index[p], True, shards.get(p)
            )
            for p in shapes
        }
        used: set[str] = set()
        for st in headers.values():  # shard by shard, each tensor once, in file order
            for key in st.keys():
                if where.get(key) is not st:
                    continue
                r = rules[key]
                if key in used:
                    raise CheckpointError(f"internal: {key} used twice")
                tensor = _read(st, key)
                for pc, part in zip(r.pieces, r.split(tensor), strict=True):
                    view = stores[pc.path][pc.index] if pc.index else stores[pc.path]
                    view.write(np.asarray(pc.to_ours(part), leaf_dtype[pc.path])).result()
                used.add(key)
                if bar:
                    bar.update(1, tensor.nbytes)
                big = tensor.nbytes > RELEASE_BYTES
                del tensor
                if big:
                    _release()
            _release()
        del stores
        write_orbax_metadata(params_dir, list(shapes))
        if used != set(rules):
            raise CheckpointError(f"internal: tensors not used: {sorted(set(rules) - used)}")
        if bar:
            bar.close()
        shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(tmp, "config.json"))
        copy_side_files(hf_dir, tmp)
        meta = {
            "format": FORMAT,
            "source": os.path.abspath(hf_dir),
            "dtype": dtype or "source",
            "mesh": dict(mesh) if mesh else None,
            "multimodal_prefix": multimodal,
            "fused_experts": fused,
            "vision_prefix": vision_prefix,
            "tie_word_embeddings_lm_head": "lm_head.weight" in where,
            "leaves": ["/".join(p) for p in shapes],
            "leaf_dtypes": {"/".join(p): str(d) for p, d in leaf_dtype.items()},
            "source_dtypes": src_dtypes,
        }
        with open(os.path.join(tmp, "convert.json"), "w") as f:
            json.dump(meta, f, indent=1)
        finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for st in headers.values():
            st.close()
    return os.path.abspath(out)


# ---------------------------------------------------------------- orbax reading
def restore_params(
    ckpt_dir: str | os.PathLike, shardings: Any | None = None
) -> tuple[Qwen35Config, dict]:
    """(config, params) from a `hf_to_orbax` checkpoint.

    params is a plain nested dict with the structure of `unbox(abstract_params(config))`, as
    numpy arrays (host memory), or, with `shardings` (the same structure of `NamedSharding`s),
    as jax arrays restored straight into that layout (each process reads only its chunks).
    `<ckpt_dir>/params` is a plain orbax PyTree checkpoint; this is `PyTreeCheckpointer.restore`.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = os.fspath(ckpt_dir)
    meta = read_meta(ckpt_dir)
    config = config_from_hf(ckpt_dir)
    shapes = leaf_shapes(config)
    stored = {tuple(n.split("/")) for n in meta["leaves"]}
    if stored != set(shapes):
        raise CheckpointError(
            f"{ckpt_dir}: stored leaves do not match the config: missing "
            f"{sorted('/'.join(p) for p in set(shapes) - stored)}, unexpected "
            f"{sorted('/'.join(p) for p in stored - set(shapes))}"
        )
    tmpl: dict = {}
    for p, s in shapes.items():
        if shardings is None:
            args = ocp.RestoreArgs(restore_type=np.ndarray)
        else:
            args = ocp.ArrayRestoreArgs(
                sharding=get_leaf(shardings, p),
                global_shape=s.shape,
                dtype=np.dtype(meta["leaf_dtypes"]["/".join(p)]),
            )
        set_leaf(tmpl, p, args)
    params = _ckptr().restore(
        os.path.join(ckpt_dir, "params"), args=ocp.args.PyTreeRestore(restore_args=tmpl)
    )
    for p, s in shapes.items():
        leaf = get_leaf(params, p)
        if tuple(leaf.shape) != tuple(s.shape):
            raise CheckpointError(
                f"{ckpt_dir}: leaf {'/'.join(p)} has shape {leaf.shape}, the config wants {s.shape}"
            )
    return config, params


# ---------------------------------------------------------------- orbax -> hf
def write_hf_shards(
    tmp: str,
    rule_list: list[Rule],
    open_leaf: Any,
    dtype_of: Any,
    max_shard_bytes: int,
    bar: Progress | None,
) -> None:
    """Rebuilds every Hugging Face tensor of `rule_list` into safetensors shards in `tmp`, plus
    `model.safetensors.index.json`. `open_leaf(path)` gives a tensorstore of one leaf (read one
    stacked entry at a time), `dtype_of(key, joined)` the output dtype: memory about one shard."""
    weight_map: dict[str, str] = {}
    shard: list[tuple[str, np.ndarray]] = []
    shard_bytes = 0
    names: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(names) + 1:05d}.safetensors"
        write_safetensors(os.path.join(tmp, name), shard)
        names.append(name)
        for k, _ in shard:
            weight_map[k] = name
        shard, shard_bytes = [], 0

    total_size = 0
    stores: dict[Path, Any] = {}
    for r in rule_list:
        parts = []
        for pc in r.pieces:
            if pc.path not in stores:
                stores[pc.path] = open_leaf(pc.path)
            view = stores[pc.path][pc.index] if pc.index else stores[pc.path]
            parts.append(pc.to_hf(np.asarray(view.read().result())))
        joined = r.join(parts)
        tensor = np.ascontiguousarray(joined.astype(dtype_of(r.key, joined)))
        if tuple(tensor.shape) != r.shape:
            raise CheckpointError(f"internal: {r.key} has shape {tensor.shape}")
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
            _release()
        shard.append((r.key, tensor))
        shard_bytes += tensor.nbytes
        total_size += tensor.nbytes
        if bar:
            bar.update(1, tensor.nbytes)
    flush()
    if bar:
        bar.close()
    # rename model-0000i.safetensors -> model-0000i-of-0000n.safetensors
    n = len(names)
    final = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(names)}
    for old, new in final.items():
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": {k: final[v] for k, v in weight_map.items()},
    }
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def orbax_to_hf(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    dtype: str | None = None,
) -> str:
    """Write config.json, safetensors shards and their index from a `hf_to_orbax` checkpoint,
    or from a `train.main` checkpoint (a workdir or one of its step directories; see
    `trainer_export.py`).

    Tensors take their source dtype and layout (recorded in convert.json), so hf -> orbax -> hf
    is bit-identical whenever the orbax dtype can hold the source values; `dtype` ('bfloat16' or
    'float32') casts every tensor instead.
    """
    ckpt_dir, out = os.fspath(ckpt_dir), os.fspath(out)
    if not is_converted_checkpoint(ckpt_dir):
        from qwen35_jax.convert import trainer_export  # noqa: PLC0415

        return trainer_export.export(ckpt_dir, out, max_shard_bytes, progress, dtype)
    meta = read_meta(ckpt_dir)
    config = config_from_hf(ckpt_dir)
    rule_list = hf_rules(
        config,
        multimodal_prefix=meta["multimodal_prefix"],
        fused_experts=meta["fused_experts"],
        vision_prefix=meta["vision_prefix"],
    )
    src = meta["source_dtypes"]
    cast = np.dtype(dtype) if dtype else None
    total = sum(
        int(np.prod(r.shape)) * (cast or DTYPES[src.get(r.key, "F32")]).itemsize for r in rule_list
    )
    bar = Progress("orbax-to-hf", len(rule_list), total) if progress else None
    params_dir = os.path.join(ckpt_dir, "params")

    def open_leaf(path: Path) -> Any:
        return leaf_store(params_dir, path, (), np.dtype("f4"), 0, False)

    def dtype_of(key: str, joined: np.ndarray) -> np.dtype:
        return cast or (DTYPES[src[key]] if key in src else joined.dtype)

    tmp = atomic_dir(out)
    try:
        write_hf_shards(tmp, rule_list, open_leaf, dtype_of, max_shard_bytes, bar)
        shutil.copy(os.path.join(ckpt_dir, "config.json"), os.path.join(tmp, "config.json"))
        copy_side_files(ckpt_dir, tmp)
        finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out)


__all__ = [
    "CODES",
    "DEFAULT_SHARD_BYTES",
    "FORMAT",
    "SIDE_FILES",
    "hf_to_orbax",
    "is_converted_checkpoint",
    "leaf_shapes",
    "orbax_to_hf",
    "restore_params",
    "shard_shapes",
    "write_hf_shards",
]
