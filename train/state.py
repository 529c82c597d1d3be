"""The train state, built abstractly first: shapes and shardings before any memory or FLOPs.

    TrainState(step, params, opt_state, skipped)       skipped: non-finite steps left out

Shardings: the parameters' logical axis names (from `qwen35_jax.abstract_params`) resolve to
mesh shardings through `qwen35_jax.sharding.logical_to_mesh_sharding`; every optimizer-state leaf
that mirrors a parameter (Adam moments) takes that parameter's sharding
(`optax.tree_map_params`); scalars (step, counts) are replicated. The state is then created by a
jitted function with these `out_shardings`, so each device only ever holds its own shards.
`batch_shardings` gives the step's other input: batch rows over the batch axes.

Initial parameters: random (`init_params`), or given (from a Hugging Face checkpoint via
`qwen35_jax.load_hf`, or the params of one of our orbax checkpoints) with a fresh optimizer.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import qwen35_jax
from qwen35_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken (including skipped ones)
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32 scalar: steps whose loss or gradient was not finite


def abstract_state(
    model_cfg: qwen35_jax.Qwen35Config,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    runtime: qwen35_jax.Runtime | None = None,
) -> tuple[TrainState, TrainState]:
    """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)."""
    boxed = qwen35_jax.abstract_params(model_cfg, runtime=runtime)
    param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh)
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=params, opt_state=opt_state, skipped=scalar)
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, skipped=replicated
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def init_state(
    model_cfg: qwen35_jax.Qwen35Config,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    params: Any | None = None,
    *,
    runtime: qwen35_jax.Runtime | None = None,
) -> TrainState:
    """A fresh state (step 0) on the mesh: random parameters, or `params` if given."""
    _, shardings = abstract_state(model_cfg, tx, mesh, runtime=runtime)
    zero = jnp.zeros((), jnp.int32)

    def from_params(p):
        return TrainState(step=zero, params=p, opt_state=tx.init(p), skipped=zero)

    with jax.set_mesh(mesh), sharding.axis_rules():
        if params is None:
            make = jax.jit(
                lambda key: from_params(qwen35_jax.init_params(model_cfg, key, runtime=runtime)),
                out_shardings=shardings,
            )
            return make(rng)
        params = jax.device_put(params, shardings.params)
        return jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(params)


def check_params_match(params: Any, abstract_params: Any, what: str) -> None:
    """Raises ValueError naming the first parameter whose path, shape or presence differs."""
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ValueError(
                f"{what}: parameter {key} has shape {got.get(key)}, the model config expects "
                f"{want.get(key)}"
            )


def batch_shardings(mesh: jax.sharding.Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Rows over the batch axes; [B, T] arrays as ("batch", "length"), others replicated."""

    def one(shape: tuple[int, ...]) -> Any:
        names = ("batch", "length") if len(shape) == 2 else ("batch",) + (None,) * (len(shape) - 1)
        boxed = nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.int32), names=names)
        return sharding.logical_to_mesh_sharding({"x": boxed}, mesh)["x"]

    return {k: one(shape) for k, shape in shapes.items()}
