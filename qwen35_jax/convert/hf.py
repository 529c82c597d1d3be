"""Load a Hugging Face Qwen3.5 checkpoint directory into (config, params).

The directory holds `config.json` and either one `model.safetensors` or several shards with a
`model.safetensors.index.json`. Tensors are read one at a time from memory-mapped shards and
written into preallocated leaves of the parameter tree (the name table is `hf_names.py`).
Everything wrong with the checkpoint is collected and reported together: missing tensors,
unexpected tensors, tensors of the wrong shape, and unreadable shards (by file name).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qwen35_jax.config import Qwen35Config
from qwen35_jax.convert.hf_names import Rule, hf_rules
from qwen35_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile
from qwen35_jax.convert.vision_names import detect_prefix
from qwen35_jax.hf_config import from_hf as config_from_hf
from qwen35_jax.model import abstract_params

log = logging.getLogger(__name__)

VISION_PREFIXES = ("model.visual.", "visual.")


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: lists every offending key or file."""


def shard_files(path: str | os.PathLike) -> dict[str, list[str]]:
    """{shard file path: [tensor names]} for a checkpoint directory."""
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(os.path.join(path, fname), []).append(key)
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    return {os.path.join(path, f): [] for f in shards}


def iter_tensors(files: dict[str, list[str]]) -> Iterator[tuple[str, str, SafetensorsFile]]:
    """(file, tensor name, open file) for every tensor, one shard open at a time."""
    for fname in files:
        st = SafetensorsFile(fname)
        try:
            for key in st.keys():
                yield fname, key, st
        finally:
            st.close()


def detect_layout(keys: list[str]) -> tuple[bool, bool]:
    """(multimodal prefix `model.language_model.`, fused expert tensors)."""
    multimodal = any(k.startswith("model.language_model.") for k in keys)
    fused = any(k.endswith("experts.gate_up_proj") for k in keys)
    return multimodal, fused


def describe_problems(problems: dict[str, list[str]], path: str) -> str:
    lines = [f"checkpoint {path} does not match its config:"]
    for title, items in problems.items():
        if items:
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
    return "\n".join(lines)


def load_hf(
    path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, config: Qwen35Config | None = None
) -> tuple[Qwen35Config, dict]:
    """Read a Hugging Face checkpoint directory: (config, params) with params in `dtype`."""
    path = os.fspath(path)
    if config is None:
        config = config_from_hf(path)
    files = shard_files(path)
    # list all keys first (headers only) to detect the layout
    all_keys, headers = [], {}
    for fname in files:
        try:
            headers[fname] = SafetensorsFile(fname)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        all_keys += headers[fname].keys()
    multimodal, fused = detect_layout(all_keys)
    # with a vision_config the tower is read too; without one its tensors are skipped
    with_vision = config.vision_config is not None
    vision_prefix = detect_prefix(all_keys) if with_vision else None
    rules: dict[str, Rule] = {
        r.key: r
        for r in hf_rules(
            config, multimodal_prefix=multimodal, fused_experts=fused, vision_prefix=vision_prefix
        )
    }

    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = nn.meta.unbox(abstract_params(config))
    leaves = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np_dtype), shapes)

    problems: dict[str, list[str]] = {
        "missing": [],
        "unexpected": [],
        "wrong shape": [],
        "unreadable": [],
    }
    seen: set[str] = set()
    skipped_vision = 0
    optional = set() if not config.text_config.tie_word_embeddings else {"lm_head.weight"}
    for fname, st in headers.items():
        for key in st.keys():
            if not with_vision and key.startswith(VISION_PREFIXES):
                skipped_vision += 1
                continue
            rule = rules.get(key)
            if rule is None:
                if key not in optional:
                    problems["unexpected"].append(f"{key} (in {os.path.basename(fname)})")
                continue
            if st.shape(key) != rule.shape:
                found = f"found {st.shape(key)} in {os.path.basename(fname)}"
                problems["wrong shape"].append(f"{key}: expected {rule.shape}, {found}")
                continue
            try:
                tensor = st.get(key)
            except SafetensorsError as e:
                problems["unreadable"].append(str(e))
                continue
            for piece, part in zip(rule.pieces, rule.split(tensor), strict=True):
                leaf = leaves
                for name in piece.path:
                    leaf = leaf[name]
                leaf[piece.index] = piece.to_ours(part).astype(np_dtype)
            seen.add(key)
        st.close()
    problems["missing"] = sorted(k for k in rules if k not in seen)
    if any(problems.values()):
        raise CheckpointError(describe_problems(problems, path))
    if skipped_vision:
        log.warning(
            "load_hf: skipped %d vision tensors (model.visual.*): the config has no vision_config",
            skipped_vision,
        )
    params = jax.tree_util.tree_map(jnp.asarray, leaves)
    return config, params
