"""The decode step as `launch.compile --decode` compiles it: one token per row for a pod's batch.

    fn(params, state, ids_B1) = qwen35_jax.decode.decode_step(config, params, state, ids_B1)
        -> (logits [B, 1, V] float32, the state one token longer)

Inputs, all abstract (`jax.ShapeDtypeStruct` with shardings, nothing allocated):
- params: the trainer's parameter tree (`qwen35_jax.abstract_params`, the checkpoint's dtype),
  sharded as in training (`sharding.logical_to_mesh_sharding` on the config's mesh);
- state: `decode_state.abstract_decode_state(config, B, S)`, S = context slots per attention
  layer, each leaf sharded by its logical names (`decode_state.leaf_axes`: rows over the batch
  mesh axes, heads over `tensor`), donated (generation carries it through its loop);
- ids_B1: int32 [B, 1], rows over the batch axes.
The figures a reader checks the compiler against: the bytes per chip of the parameters' and the
state's shards (`Inputs.param_bytes`, `Inputs.state_bytes`), which the compiler's argument
bytes must equal.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding

from qwen35_jax import decode, decode_state, sharding
from qwen35_jax.model import abstract_params


class Inputs(NamedTuple):
    fn: Any  # jitted (params, state, ids_B1) -> (logits, state), the state donated
    args: tuple[Any, Any, Any]  # abstract params, state, ids_B1
    param_bytes: float  # per chip: the largest shard of every parameter, summed
    state_bytes: float  # per chip: the largest shard of every decode-state leaf, summed


def _shard_bytes(tree: Any) -> float:
    def one(x: jax.ShapeDtypeStruct) -> float:
        return float(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def decode_inputs(
    model_cfg: Any, runtime: Any, mesh: jax.sharding.Mesh, batch: int, context: int
) -> Inputs:
    """The jitted decode step and its abstract, sharded inputs for `batch` rows and `context`
    cache slots (module doc)."""
    if batch < 1 or context < 2:
        raise ValueError(f"decode batch {batch} must be >= 1 and context {context} >= 2")
    boxed = abstract_params(model_cfg, runtime=runtime)
    param_sh = sharding.logical_to_mesh_sharding(boxed, mesh)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        param_sh,
    )
    shapes = decode_state.abstract_decode_state(model_cfg, batch, context, runtime=runtime)
    flat, treedef = jax.tree.flatten(shapes)
    state_sh = jax.tree.unflatten(
        treedef,
        [
            NamedSharding(mesh, sharding.logical_spec(axes, x.shape, mesh))
            for x, axes in zip(flat, decode_state.leaf_axes(shapes), strict=True)
        ],
    )
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh
    )
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sharding.batch_sharding(mesh, batch))

    def step(params, state, ids_B1):
        return decode.decode_step(model_cfg, params, state, ids_B1, runtime=runtime)

    fn = jax.jit(
        step,
        in_shardings=(param_sh, state_sh, ids.sharding),
        out_shardings=(None, state_sh),
        donate_argnums=1,
    )
    return Inputs(fn, (params, state, ids), _shard_bytes(params), _shard_bytes(state))
