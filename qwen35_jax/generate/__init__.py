"""Batched generation: prefill of ragged prompts, then all rows decoded in one jitted loop.

    out = generate(config, params, prompts, max_new_tokens=N, rng=key, temperature=0.0,
                   top_k=0, top_p=1.0, stop_token_ids=(), pixel_values=None, ...)
    out.tokens    int32 [B, N]    generated tokens; after a row stops: the pad id (0 if none)
    out.lengths   int32 [B]       tokens generated per row, the stop token included
    out.logprobs  float32 [B, N]  log-softmax(logits / temperature) of each chosen token before
                                  top-k/top-p (temperature 1 when greedy); 0 after a stop

Steps, all inside one `jax.jit` (compiled once per prompt bucket, batch and settings):
1. The prompts are right-padded to a bucket T (a power of two, >= 16) and prefilled in one pass
   (`decode.prefill`; attention caches of S = T + N slots, `decode_state.py`). With images or
   videos (placeholders already expanded, as `expand_placeholders` makes them) the tower runs
   and the positions are the 3-D rope index; decoding continues them at length + rope_delta.
2. Token 0 is sampled from the last prompt logits (`sampling.sample`), then a `lax.while_loop`
   alternates `decode.decode_step` and sampling until N tokens or until every row has emitted
   one of `stop_token_ids` (`decode_loop`). Step i draws with `fold_in(rng, i)`: a key
   reproduces the output.

Under a mesh (`sharding.use_mesh`) with sharded parameters the same code runs sharded: rows over
the batch axes, caches like the activations (`decode_state.constrain_decode_state`); the outputs
come back replicated, so every process of a multi-process run reads every row.
num_draft_tokens=k >= 1: MTP speculative decoding (`speculative.py`): a SpeculativeOutput,
the same three fields, then num_accepted / num_drafted per row (GenerateOutput stays 3 fields).
CLI: `python -m qwen35_jax.generate --checkpoint DIR --prompt "..."` (`__main__.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from qwen35_jax import sharding
from qwen35_jax.config import Qwen35Config
from qwen35_jax.decode import decode_step, prefill
from qwen35_jax.decode_state import DecodeState
from qwen35_jax.fusion import check_placeholder_counts, vision_inputs
from qwen35_jax.generate.outputs import Emitted, emit_column, empty
from qwen35_jax.generate.speculative import speculative_loop
from qwen35_jax.positions import rope_index
from qwen35_jax.runtime import Runtime, resolve
from qwen35_jax.sampling import sample

MIN_BUCKET = 16


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, N]
    lengths: jax.Array  # int32 [B]
    logprobs: jax.Array  # float32 [B, N]


class SpeculativeOutput(NamedTuple):
    """`generate(..., num_draft_tokens >= 1)`: GenerateOutput's fields, then the drafts'."""

    tokens: jax.Array  # int32 [B, N]
    lengths: jax.Array  # int32 [B]
    logprobs: jax.Array  # float32 [B, N]
    num_accepted: jax.Array  # int32 [B] drafts accepted
    num_drafted: jax.Array  # int32 [B] drafts proposed while the row ran

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed drafts over all rows."""
        drafted = int(np.sum(np.asarray(self.num_drafted)))
        return float(np.sum(np.asarray(self.num_accepted))) / max(drafted, 1)


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())


def pad_id(config: Qwen35Config) -> int:
    pad = config.text_config.pad_token_id
    return 0 if pad is None else int(pad)


def _check(config, prompts, max_new_tokens, temperature, top_k, top_p) -> list[list[int]]:
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = [[int(t) for t in p] for p in prompts]
    vocab = config.text_config.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if min(row) < 0 or max(row) >= vocab:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab})")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if int(top_k) < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    longest = max(len(r) for r in rows) + int(max_new_tokens)
    limit = config.text_config.max_position_embeddings
    if longest > limit:
        raise ValueError(
            f"prompt + max_new_tokens = {longest} tokens exceeds the model's context "
            f"max_position_embeddings={limit}"
        )
    return rows


def _constrain_rows(x: jax.Array) -> jax.Array:
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "slots",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop_token_ids",
        "stream",
        "runtime",
        "num_draft_tokens",
    ),
)
def generate_arrays(
    params,
    ids_BT,
    lengths_B,
    rng,
    pixel_values,
    image_grid_thw,
    pixel_values_videos,
    video_grid_thw,
    *,
    config: Qwen35Config,
    slots: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_token_ids: tuple[int, ...],
    stream: Callable | None,
    runtime: Runtime | None = None,
    num_draft_tokens: int = 0,
) -> GenerateOutput | SpeculativeOutput:
    """The jitted core of `generate`: prompts already padded to a bucket, settings static."""
    ids_BT, lengths_B = _constrain_rows(ids_BT), _constrain_rows(lengths_B)
    t = ids_BT.shape[1]
    vision = vision_inputs(
        config, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
    )
    positions = None
    if vision is not None:
        seg_BT = (jnp.arange(t)[None, :] < lengths_B[:, None]).astype(jnp.int32)
        positions = rope_index(
            config,
            ids_BT,
            image_grid_thw if vision.replace_images else None,
            video_grid_thw if vision.replace_videos else None,
            segment_ids=seg_BT,
        )
    if num_draft_tokens:
        out = SpeculativeOutput(
            *speculative_loop(
                params,
                ids_BT,
                lengths_B,
                rng,
                positions,
                vision,
                config=config,
                slots=slots,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_token_ids=stop_token_ids,
                num_draft_tokens=num_draft_tokens,
                pad=pad_id(config),
                runtime=runtime,
            )
        )
        return _replicated(out)
    logits_BV, state = prefill(
        config,
        params,
        ids_BT,
        lengths_B,
        slots,
        positions=positions,
        vision=vision,
        runtime=runtime,
    )
    out = decode_loop(
        config,
        params,
        state,
        logits_BV,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=stop_token_ids,
        stream=stream,
        runtime=runtime,
    )
    return _replicated(out)


def decode_loop(
    config: Qwen35Config,
    params: dict,
    state: DecodeState,
    logits_BV: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_token_ids: tuple[int, ...],
    stream: Callable | None = None,
    runtime: Runtime | None = None,
) -> GenerateOutput:
    """`generate` after the prefill: token 0 sampled from logits_BV (each row's last prompt
    token), then one `lax.while_loop` of `decode_step` + sampling until max_new_tokens or until
    every row has stopped (step i draws with fold_in(rng, i)). Traced inside `generate_arrays`;
    jitted alone by `bench/generate.py` (per-token time without the prefill)."""
    b = logits_BV.shape[0]
    n = max_new_tokens
    pad = pad_id(config)

    def emit(i, logits_BV, out: Emitted) -> Emitted:
        tok_B, lp_B = sample(jax.random.fold_in(rng, i), logits_BV, temperature, top_k, top_p)
        new, tok_B = emit_column(out, i, tok_B, lp_B, pad, stop_token_ids)
        if stream is not None:
            jax.debug.callback(stream, i, tok_B, out.done_B, ordered=True)
        return new

    carry = emit(0, logits_BV, empty(b, n, pad))

    def cond(c):
        i, _, out = c
        return (i < n) & ~jnp.all(out.done_B)

    def body(c):
        i, state, out = c
        prev_B1 = lax.dynamic_slice_in_dim(out.tokens_BN, i - 1, 1, axis=1)
        logits_B1V, state = decode_step(config, params, state, prev_B1, runtime=runtime)
        return i + 1, state, emit(i, logits_B1V[:, 0], out)

    _, _, (tokens_BN, logprobs_BN, _, count_B) = lax.while_loop(
        cond, body, (jnp.asarray(1, jnp.int32), state, carry)
    )
    return GenerateOutput(tokens_BN, count_B, logprobs_BN)


def _replicated(out):
    if jax.sharding.get_abstract_mesh().empty:
        return out
    # replicated: every process of a multi-process run can read every row
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, P()), out)


def generate(
    config: Qwen35Config,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    pixel_values: jax.Array | None = None,
    image_grid_thw: jax.Array | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    runtime: Runtime | None = None,
    num_draft_tokens: int = 0,
) -> GenerateOutput | SpeculativeOutput:
    """Continues every prompt (a list of token ids; ragged lengths) by up to max_new_tokens.

    See the module docstring for the outputs and the sampling settings (transformers'
    semantics: `sampling.py`). rng: a `jax.random.key` (default key 0; only sampling reads it).
    Visual inputs as `forward` takes them, placeholders expanded in the prompts.
    stream(i, tokens_B, done_B): called (on the host) with the i-th token of every row as it
    is chosen (done_B: the rows that had stopped before it; their token is the pad id).
    runtime: dtypes, kernel sizes, MoE dispatch (`qwen35_jax.Runtime`; None: defaults).
    num_draft_tokens: k >= 1 decodes speculatively, the MTP head drafting k tokens per step
    (`speculative.py`; greedy output identical, sampling exactly distributed as plain
    decoding): a SpeculativeOutput, GenerateOutput's three fields then num_accepted and
    num_drafted per row, and .acceptance_rate. 0: plain decoding (GenerateOutput).
    """
    rows = _check(config, prompts, max_new_tokens, temperature, top_k, top_p)
    k = int(num_draft_tokens)
    if k < 0:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 0 (0 = no drafts)")
    if k and not config.text_config.mtp_num_hidden_layers:
        raise ValueError(
            f"num_draft_tokens={k} needs the model's MTP head; this config has "
            "mtp_num_hidden_layers=0"
        )
    if k and stream is not None:
        raise ValueError("stream is not supported with num_draft_tokens >= 1")
    lengths_B = np.asarray([len(r) for r in rows], np.int32)
    t = prompt_bucket(int(lengths_B.max()))
    ids_BT = np.full((len(rows), t), pad_id(config), np.int32)
    for i, r in enumerate(rows):
        ids_BT[i, : len(r)] = r
    if pixel_values is not None or pixel_values_videos is not None:
        check_placeholder_counts(
            config,
            ids_BT,
            None if pixel_values is None else image_grid_thw,
            None if pixel_values_videos is None else video_grid_thw,
        )
    if rng is None:
        rng = jax.random.key(0)
    return generate_arrays(
        params,
        ids_BT,
        lengths_B,
        rng,
        pixel_values,
        image_grid_thw,
        pixel_values_videos,
        video_grid_thw,
        config=config,
        slots=t + int(max_new_tokens) + k,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop_token_ids=tuple(int(s) for s in stop_token_ids),
        stream=stream,
        runtime=resolve(runtime),
        num_draft_tokens=k,
    )
