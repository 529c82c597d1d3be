"""Greedy completion: a small helper to show what a trained model does (no KV cache).

All prompts run as one batch in a fixed-size buffer [P, max_prompt + num_tokens] (one
compilation): each row's prompt and generated tokens are segment 1, the rest padding (segment 0),
and each row's next token is the argmax of the logits at its last real position. Prompts with
images (vision_start, placeholders, vision_end already expanded) take their patches in the per-row
form: pixel_values [P, P_row, F] and image_grid_thw [P, G_row, 3] (zero padded), positions then
being the 3-D rope index. Every new token
costs one full forward pass: fine for tiny models at the end of a run; real decoding with caches
belongs to `qwen35_jax` generation (a later issue; `greedy_complete` is the one place to swap).

Multi-process: every process calls this with the same prompts. Under a mesh (`jax.set_mesh`) the
params may span every process's devices; the prompts enter replicated and each step's tokens come
out replicated (`out_shardings`), so every process reads the same tokens and no process waits in
a collective the others never join.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax


def greedy_complete(
    config: qwen35_jax.Qwen35Config,
    params: Any,
    prompts: list[list[int]],
    num_tokens: int,
    *,
    stop_id: int | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    runtime: qwen35_jax.Runtime | None = None,
) -> list[list[int]]:
    """For each prompt, the `num_tokens` greedy next tokens (cut before `stop_id`)."""
    lengths_P = np.asarray([len(p) for p in prompts])
    if lengths_P.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lengths_P.max()) + num_tokens
    ids_PL = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids_PL[i, : len(p)] = p

    mesh = jax.sharding.get_abstract_mesh()
    replicated = None if mesh.empty else jax.sharding.PartitionSpec()

    @functools.partial(jax.jit, out_shardings=replicated)
    def next_tokens(params, ids_PL, lengths_P, pixels, grids):
        seg_PL = (jnp.arange(width)[None, :] < lengths_P[:, None]).astype(jnp.int32)
        logits_PLV = qwen35_jax.apply(
            config,
            params,
            ids_PL,
            segment_ids=seg_PL,
            pixel_values=pixels,
            image_grid_thw=grids,
            runtime=runtime,
        ).logits
        last_PV = jnp.take_along_axis(logits_PLV, (lengths_P - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last_PV, axis=-1)

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(num_tokens):
        toks_P = np.asarray(
            next_tokens(params, ids_PL.copy(), lengths_P.copy(), pixel_values, image_grid_thw)
        )
        for i, tok in enumerate(toks_P):
            if done[i] or (stop_id is not None and tok == stop_id):
                done[i] = True
                continue
            out[i].append(int(tok))
            ids_PL[i, lengths_P[i]] = tok
            lengths_P[i] += 1
    return out
