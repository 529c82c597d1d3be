"""Multi-process helpers: joining the processes of a job, and the rows each process loads.

`initialize_distributed` joins the processes (explicit environment, SLURM, Cloud TPU
auto-detection); each process loads only the rows of the global batch that its devices hold
(`process_batch_slice`) and `make_global_batch` assembles the global arrays from those pieces.
The batch axes come from the logical-axis table (`sharding.batch_sharding`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from qwen35_jax import sharding


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


def process_batch_slice(mesh: jax.sharding.Mesh, global_batch: int) -> slice:
    """The rows of the global batch that this process loads (those its devices hold)."""
    batch_sh = sharding.batch_sharding(mesh, global_batch)
    index_map = batch_sh.addressable_devices_indices_map((global_batch,))
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
    batch_sh = sharding.batch_sharding(mesh, global_batch_size)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            batch_sh, x, (global_batch_size, *x.shape[1:])
        )

    return jax.tree.map(one, local_tree)
