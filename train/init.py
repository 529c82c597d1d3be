"""Where a run's initial parameters come from: the three routes, in one module.

    model_config(config)         the architecture: `config.model`, or the config.json of
                                 `init.from_hf` / of a converted `init.from_checkpoint`; never
                                 the runtime (`config.runtime`, config_schema.runtime_config)
    initial_params(config, model_cfg, abstract_params) -> params, or None (random init)
      init.from_hf               a Hugging Face checkpoint dir: every weight read into this
                                 host's memory as float32 (`qwen35_jax.load_hf`), then sharded
      init.from_checkpoint       a converted checkpoint (`python -m qwen35_jax.convert
                                 hf-to-orbax`): restored shard by shard straight into each
                                 device's layout (`orbax_io.restore_params`); or one of our
                                 training checkpoints (`params_from_training_checkpoint`: a step
                                 dir or a checkpoint dir, its latest step; optimizer state
                                 not read)

Every route checks the parameter tree against the model config (path and shape of every leaf)
and starts a fresh optimizer at step 0 (train/state.py `init_state`). Resuming the run's own
workdir is not an init route: the loop restores its latest checkpoint first.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import qwen35_jax
from qwen35_jax.convert import orbax_io
from train import config_schema
from train.checkpointing import checkpoint_step_dir
from train.state import check_params_match


def model_config(config: ml_collections.ConfigDict) -> qwen35_jax.Qwen35Config:
    """The architecture of the run (module docstring); refuses an `init.from_hf` checkpoint
    that cannot fit this host's memory before reading any weight."""
    if config.init.from_hf:
        hf_cfg = qwen35_jax.config_from_hf(config.init.from_hf)
        check_fits_host_memory(config.init.from_hf, hf_cfg)
        return hf_cfg
    ckpt = config.init.from_checkpoint
    if ckpt and orbax_io.is_converted_checkpoint(ckpt):
        return qwen35_jax.config_from_hf(ckpt)
    return config_schema.model_config(config)


def initial_params(
    config: ml_collections.ConfigDict, model_cfg: qwen35_jax.Qwen35Config, abstract_params: Any
) -> Any | None:
    """The parameters of `init.*` shaped as `abstract_params` (ShapeDtypeStructs with
    shardings), or None for a random init."""
    if config.init.from_hf:
        _, params = qwen35_jax.load_hf(config.init.from_hf, jnp.float32, config=model_cfg)
        check_params_match(params, abstract_params, f"init.from_hf={config.init.from_hf!r}")
        return params
    ckpt = config.init.from_checkpoint
    if ckpt and orbax_io.is_converted_checkpoint(ckpt):
        shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        params = orbax_io.restore_params(ckpt, shardings)[1]
        check_params_match(params, abstract_params, f"init.from_checkpoint={ckpt!r}")
        return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_params)
    if ckpt:
        return params_from_training_checkpoint(ckpt, abstract_params)
    return None


def params_from_training_checkpoint(path: str, abstract_params: Any) -> Any:
    """The params of one of our training checkpoints (`path`: step dir or checkpoint dir), as
    given by `abstract_params` (ShapeDtypeStructs with shardings); optimizer state is not read."""
    item_dir = os.path.join(checkpoint_step_dir(path), "state")
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    return ocp.PyTreeCheckpointer().restore(item_dir, args=args)["params"]


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_host_memory(hf_dir: str, hf_cfg: qwen35_jax.Qwen35Config) -> None:
    """`init.from_hf` reads every weight into this host's memory as float32 (then shards it):
    refuse before reading when that cannot fit, pointing to the streaming converter."""
    shapes = jax.tree.leaves(qwen35_jax.abstract_params(hf_cfg))
    need = sum(4 * int(np.prod(s.shape)) for s in shapes)
    have = available_host_bytes()
    if have is not None and need > 0.8 * have:
        raise config_schema.ConfigValueError(
            f"init.from_hf={hf_dir!r}: loading it needs {need / 2**30:.1f} GiB of host memory "
            f"(float32 weights), this host has {have / 2**30:.1f} GiB available. Convert it "
            "once with `python -m qwen35_jax.convert hf-to-orbax --hf_dir DIR --out CKPT "
            "[--mesh ...]` and pass --config.init.from_checkpoint=CKPT instead (restored "
            "shard by shard, straight into each device's layout)."
        )
