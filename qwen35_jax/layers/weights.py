"""How layers create their weights: one helper for every projection, bias and gate vector.

    w = weight(module, name, shape, axes, init)     stored in the runtime's param dtype with
                                                    logical axis names (`sharding.py`), returned
                                                    cast to the compute dtype (cast=False: as
                                                    stored, for float32 gate parameters)

Initialisers: `KERNEL_INIT` (normal, std 0.02, as Hugging Face's initializer_range) for every
projection; `ZEROS` / `ONES` for biases and gains.

`RuntimeDtypes` gives a module with a ``runtime: Runtime`` field its ``dtype`` (compute) and
``param_dtype`` (storage).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

KERNEL_INIT = nn.initializers.normal(0.02)
ZEROS = nn.initializers.zeros_init()
ONES = nn.initializers.ones_init()


class RuntimeDtypes:
    """Mixin for linen modules with a ``runtime`` field: ``self.dtype``, ``self.param_dtype``."""

    @property
    def dtype(self) -> jnp.dtype:
        return self.runtime.dtype

    @property
    def param_dtype(self) -> jnp.dtype:
        return self.runtime.weights_dtype


def weight(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    init: Callable = KERNEL_INIT,
    *,
    cast: bool = True,
) -> jax.Array:
    """``module``'s parameter `name` [shape] with logical `axes`, cast to ``module.dtype``."""
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)
    return w.astype(module.dtype) if cast else w
