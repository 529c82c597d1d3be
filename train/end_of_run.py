"""What a finished run shows: greedy completions of `train.prompts`, and for the digits data the
held-out captioning accuracy (caption_eval.py).

    result = evaluate(config, model_cfg, runtime, params, tokenizer, mesh)
    for line in report(result): print(line)

Every process runs both (the params may span every process's devices): the decoding is jitted on
the global sharded params with replicated outputs (sampling.greedy_complete over
`qwen35_jax.generate`: cached prefill + decode), so every process computes the same numbers and
only the printing is left to process 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections

import qwen35_jax
from qwen35_jax import sharding
from train import caption_eval
from train.data.tokenizers import Tokenizer
from train.sampling import greedy_complete


class EndOfRun(NamedTuple):
    completions: list[tuple[str, str]]  # (prompt, completion)
    digits_eval: dict[str, Any] | None  # caption_eval.digits_eval's result, or None


def completions(
    config: ml_collections.ConfigDict,
    model_cfg: qwen35_jax.Qwen35Config,
    runtime: qwen35_jax.Runtime,
    params: Any,
    tokenizer: Tokenizer,
) -> list[tuple[str, str]]:
    """(prompt, greedy completion) for every non-empty `train.prompts` (none when
    `train.completion_tokens` is 0)."""
    prompts = [p for p in config.train.prompts if p]
    if not prompts or config.train.completion_tokens == 0:
        return []
    ids = [tokenizer.encode(p) for p in prompts]
    outs = greedy_complete(
        model_cfg,
        params,
        ids,
        config.train.completion_tokens,
        stop_id=tokenizer.eos_id,
        runtime=runtime,
    )
    return [(p, tokenizer.decode(o)) for p, o in zip(prompts, outs, strict=True)]


def evaluate(
    config: ml_collections.ConfigDict,
    model_cfg: qwen35_jax.Qwen35Config,
    runtime: qwen35_jax.Runtime,
    params: Any,
    tokenizer: Tokenizer,
    mesh: jax.sharding.Mesh,
) -> EndOfRun:
    """The completions and (digits data, `data.eval_examples` > 0) the held-out accuracy."""
    with sharding.use_mesh(mesh):
        texts = completions(config, model_cfg, runtime, params, tokenizer)
        result = None
        if config.data.kind == "digits" and config.data.eval_examples:
            result = caption_eval.digits_eval(
                model_cfg,
                params,
                tokenizer,
                image_size=config.data.image_size,
                count=config.data.eval_examples,
                max_patches=config.data.patches_per_row,
                runtime=runtime,
            )
    return EndOfRun(texts, result)


def report(result: EndOfRun) -> list[str]:
    """The lines to print."""
    lines = []
    if result.completions:
        lines.append("greedy completions:")
        lines += [f"  {prompt!r} -> {prompt + text!r}" for prompt, text in result.completions]
    if result.digits_eval is not None:
        lines.append(caption_eval.describe(result.digits_eval))
    return lines
