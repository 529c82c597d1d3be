"""Greedy completion for the end-of-run printout and the digits eval: `qwen35_jax.generate`.

`greedy_complete` keeps the trainer's list-of-lists interface over `qwen35_jax.generate` (batched
prefill, cached decode in one jitted loop): each prompt's `num_tokens` greedy next tokens, cut
before `stop_id`. Prompts with images (vision_start, placeholders, vision_end already expanded)
take their patches in the per-row form: pixel_values [P, P_row, F] and image_grid_thw
[P, G_row, 3] (zero padded), positions then being the 3-D rope index.

Multi-process: every process calls this with the same prompts. Under a mesh (`jax.set_mesh`) the
params may span every process's devices; the prompts enter replicated and the tokens come out
replicated (`generate` under a mesh), so every process reads the same tokens and no process waits
in a collective the others never join.
"""

from __future__ import annotations

from typing import Any

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
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    out = qwen35_jax.generate(
        config,
        params,
        prompts,
        max_new_tokens=num_tokens,
        stop_token_ids=() if stop_id is None else (stop_id,),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        runtime=runtime,
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    rows = [tokens[i, : lengths[i]].tolist() for i in range(len(prompts))]
    return [r[:-1] if r and stop_id is not None and r[-1] == stop_id else r for r in rows]
