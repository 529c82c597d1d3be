"""Rollouts: prompts -> `qwen35_jax.generate` with the trained params -> rewards -> a batch.

    collect(sampler, task, tokenizer, reward_fn, rl, step) -> Rollouts (host numpy)

Per attempt: `rl.prompts_per_step` records of the step (tasks.Task), each repeated
`rl.group_size` times, one `generate` call (one compile: the same shapes every attempt),
completions cut at the stop token, rewards (rewards.score: failures score 0 and are counted),
then DAPO's overlong shaping when on, in tokens (L = max_new_tokens, C = overlong_buffer):
    L - C < len <= L      reward += (L - C - len) / C
    truncated (no stop)   reward = -1 ("penalty"), or the row leaves the loss ("mask")
Image prompts (prompts.py) give generate their patches per row; a completion that samples a
vision special id (image placeholder, vision start/end) is cut before it and counts as truncated
(the forward pass would read it as an image). With an environment (`rl.env`, envs.py) a row is
a multi-turn episode instead (the reward is
the episode's; only the policy's tokens are in the mask).
With dynamic sampling, groups whose rewards are all equal (zero advantage) are dropped and more
records are drawn, at most `rl.max_refills` more attempts; if the batch is still short, dropped
groups fill it (their advantages are 0). `dropped_frac` = dropped / generated groups.

The batch is laid out for the policy forward pass, rows of width W = max_turns x
(max_prompt_len + max_new_tokens): ids_BW = prompt, completion, pad; in the shifted frame
[B, W-1] (position j predicts token j+1) `mask` marks the completion's tokens and `old_logp`
holds generate's sampling log-probabilities there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from train.rl import envs, prompts
from train.rl import rewards as rewards_lib


class Rollouts(NamedTuple):
    ids_BW: np.ndarray  # int32
    valid_BW: np.ndarray  # int32: 1 on prompt and completion tokens
    mask_BT: np.ndarray  # float32 [B, W-1]: completion tokens (the policy's own)
    old_logp_BT: np.ndarray  # float32 [B, W-1]
    rewards_B: np.ndarray  # float32, shaped
    raw_rewards_B: np.ndarray  # float32, the reward function's
    lengths_B: np.ndarray  # int32 completion tokens (stop included)
    truncated_B: np.ndarray  # bool
    reward_errors: int
    dropped_frac: float
    attempts: int
    seconds: float
    # image prompts (prompts.py): [B, P, F] / [B, 1, 3], None for a text-only batch
    pixels_BPF: np.ndarray | None = None
    grids_BG3: np.ndarray | None = None


def shape_rewards(
    raw_B: np.ndarray, lengths_B: np.ndarray, truncated_B: np.ndarray, rl: dict
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, keep_B): DAPO's overlong shaping in tokens (module docstring)."""
    r_B = raw_B.astype(np.float32).copy()
    keep_B = np.ones_like(r_B, dtype=bool)
    if not rl["overlong_shaping"]:
        return r_B, keep_B
    lmax, cache = rl["max_new_tokens"], rl["overlong_buffer"]
    soft = (lengths_B > lmax - cache) & (lengths_B <= lmax)
    r_B = np.where(soft, r_B + (lmax - cache - lengths_B) / cache, r_B).astype(np.float32)
    if rl["truncated"] == "penalty":
        r_B = np.where(truncated_B, -1.0, r_B).astype(np.float32)
    else:
        keep_B = ~truncated_B
    return r_B, keep_B


def layout(
    prompts: list[list[int]],
    tokens_BN: np.ndarray,
    lengths_B: np.ndarray,
    logprobs_BN: np.ndarray,
    width: int,
    pad: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids_BW, valid_BW, mask_BT, old_logp_BT) of the module docstring."""
    b = len(prompts)
    ids = np.full((b, width), pad, np.int32)
    valid = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width - 1), np.float32)
    old = np.zeros((b, width - 1), np.float32)
    for i, p in enumerate(prompts):
        n = int(lengths_B[i])
        ids[i, : len(p)] = p
        ids[i, len(p) : len(p) + n] = tokens_BN[i, :n]
        valid[i, : len(p) + n] = 1
        mask[i, len(p) - 1 : len(p) - 1 + n] = 1.0
        old[i, len(p) - 1 : len(p) - 1 + n] = logprobs_BN[i, :n]
    return ids, valid, mask, old


def completion_text(tokenizer: Any, tokens: np.ndarray, n: int, eos: int) -> str:
    ids = [int(t) for t in tokens[:n]]
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def collect(
    sampler: Callable[[list[list[int]], int], Any],
    task: Any,
    tokenizer: Any,
    reward_fn: Callable,
    rl: dict,
    step: int,
    eos: int,
    pad: int,
    env: Callable[[], envs.Env] | None = None,
    spec: Any = None,
) -> Rollouts:
    """One step's rollouts. `sampler(prompts, attempt, **visual) -> GenerateOutput`
    (host-readable; visual: pixel_values, image_grid_thw for image prompts, prompts.py, with
    the model's VisualSpec `spec`). With `env` (envs.py), each row is a multi-turn episode and
    its reward the episode's."""
    t0 = time.perf_counter()
    p, g = rl["prompts_per_step"], rl["group_size"]
    width = row_width(rl)
    kept: list[tuple] = []
    spare: list[tuple] = []
    errors, generated, attempt = 0, 0, 0
    while True:
        records = [r for r in task.records(step, attempt, p) for _ in range(g)]
        if env is not None:
            ep = envs.run_episodes(
                lambda rows, a=attempt: sampler(rows, a),
                env,
                records,
                tokenizer,
                max_turns=rl["max_turns"],
                max_new_tokens=rl["max_new_tokens"],
                width=width,
                eos=eos,
                pad=pad,
            )
            arrays = (ep.ids_BW, ep.valid_BW, ep.mask_BT, ep.old_logp_BT)
            raw, lengths_B, truncated_B = ep.rewards_B, ep.lengths_B, ep.truncated_B
            errors += ep.errors
        else:
            enc = prompts.encode(records, tokenizer, rl["max_prompt_len"], spec, rl["max_patches"])
            rows = enc.rows
            out = sampler(rows, attempt, **enc.visual())
            tokens_BN, lengths_B, logp_BN = (np.asarray(x) for x in tuple(out)[:3])
            cut_B = np.zeros(len(rows), bool)
            if enc.pixel_values is not None:  # a sampled vision id would read as an image
                lengths_B, cut_B = prompts.cut_at_vision_ids(tokens_BN, lengths_B, spec)
            texts = [
                completion_text(tokenizer, tokens_BN[i], lengths_B[i], eos) for i in range(p * g)
            ]
            raw, failed = rewards_lib.score(
                reward_fn, [r["prompt"] for r in records], texts, records
            )
            errors += failed
            truncated_B = (lengths_B == rl["max_new_tokens"]) & (tokens_BN[:, -1] != eos) | cut_B
            arrays = layout(rows, tokens_BN, lengths_B, logp_BN, width, pad)
            if enc.pixel_values is not None:
                arrays = (*arrays, enc.pixel_values, enc.image_grid_thw)
        shaped_B, keep_B = shape_rewards(np.asarray(raw), lengths_B, truncated_B, rl)
        for k in range(p):
            sl = slice(k * g, (k + 1) * g)
            group = (
                *(a[sl] for a in arrays),
                shaped_B[sl],
                np.asarray(raw[sl], np.float32),
                lengths_B[sl],
                truncated_B[sl],
                keep_B[sl],
            )
            generated += 1
            if rl["dynamic_sampling"] and np.all(shaped_B[sl] == shaped_B[sl][0]):
                spare.append(group)
            else:
                kept.append(group)
        attempt += 1
        if not rl["dynamic_sampling"] or len(kept) >= p or attempt > rl["max_refills"]:
            break
    dropped = len(spare) / generated if rl["dynamic_sampling"] else 0.0
    groups = (kept + spare)[:p]
    cols = [np.concatenate(c) for c in zip(*groups, strict=True)]
    *arrays, shaped, raw_r, lengths, trunc, keep = cols
    ids, valid, mask, old, *visual = arrays  # visual: [pixels, grids] for image prompts
    mask = mask * keep[:, None]
    return Rollouts(
        ids,
        valid,
        mask,
        old,
        shaped,
        raw_r,
        lengths,
        trunc,
        errors,
        dropped,
        attempt,
        time.perf_counter() - t0,
        *visual,
    )


def row_width(rl: dict) -> int:
    """W: max_turns x (max_prompt_len + max_new_tokens) (observations count as prompts)."""
    return rl["max_turns"] * (rl["max_prompt_len"] + rl["max_new_tokens"])


def encode_prompt(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """A text prompt's ids (prompts.py); ValueError when empty or over `max_len` tokens."""
    return prompts.encode([{"prompt": text}], tokenizer, max_len).rows[0]
