"""Pieces and rules: how one Hugging Face tensor maps onto leaves of our parameter tree.

A `Rule` is one HF tensor (key, shape) and the `Piece`s of our tree it fills: a leaf path, a
leading index into the stacked leaf, and the two array transforms (`to_ours`, `to_hf`). A fused
tensor splits along `split_axis` into `split_sizes`. The transform constructors below (`same`,
`linear`, `linear_rows_first`, `conv`, `reshape`) serve the text table (`hf_names.py`) and the
vision table (`vision_names.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Piece:
    path: tuple[str, ...]
    index: tuple[int, ...]
    to_ours: Callable[[Array], Array]
    to_hf: Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    split_axis: int = 0
    split_sizes: tuple[int, ...] = ()

    def split(self, tensor: Array) -> list[Array]:
        if len(self.pieces) == 1:
            return [tensor]
        bounds = np.cumsum(self.split_sizes)[:-1]
        return np.split(tensor, bounds, axis=self.split_axis)

    def join(self, parts: list[Array]) -> Array:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.split_axis)


def same(path, index=()) -> Piece:
    return Piece(path, index, lambda a: a, lambda a: a)


def linear(path, index, ours_shape, hf_shape) -> Piece:
    """HF Linear weight [out, in] <-> ours [in, ...out] (transposed, out axes split)."""
    return Piece(
        path,
        index,
        lambda a: a.T.reshape(ours_shape),
        lambda a: a.reshape(hf_shape[::-1]).T,
    )


def linear_rows_first(path, index, ours_shape, hf_shape) -> Piece:
    """HF Linear weight [out, in] whose *input* splits into heads: ours [...in, out]."""
    return Piece(
        path,
        index,
        lambda a: a.T.reshape(ours_shape),
        lambda a: a.reshape(hf_shape[1], hf_shape[0]).T,
    )


def conv(path, index, ours_shape) -> Piece:
    """HF depthwise conv weight [C, 1, W] <-> ours [W, heads, dim]."""
    width = ours_shape[0]
    return Piece(
        path,
        index,
        lambda a: a[:, 0, :].T.reshape(ours_shape),
        lambda a: a.reshape(width, -1).T[:, None, :],
    )


def reshape(path, index, ours_shape, hf_shape) -> Piece:
    return Piece(path, index, lambda a: a.reshape(ours_shape), lambda a: a.reshape(hf_shape))
