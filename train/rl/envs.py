"""Multi-turn (agentic) episodes: an environment answers each completion until it is done.

    class Env:                                   (plug one in with rl.env="pkg.module:Class")
        reset(record) -> str                     the first prompt
        step(completion) -> (observation, reward, done)

`run_episodes` plays one episode per row: generate a completion (the policy's tokens, with its
sampling log-probs), hand its text to the environment, append the observation's tokens as
context, and go on until the environment is done or `max_turns` turns were played. A row's
tokens are [prompt, completion 1, observation 1, completion 2, ...]; the loss mask (and so the
ratio) covers exactly the completions' tokens, never the prompt's or the environment's. The
episode's reward is the sum of the step rewards.

Built in: `CalculatorEnv` for the addition task. A completion holding "+" (e.g. "37+48") is a
call of the calculator, whose observation is the value followed by "=" ("85="); any other
completion is the final answer, scored by exact match, which ends the episode.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np


class Env(Protocol):
    def reset(self, record: dict) -> str: ...

    def step(self, completion: str) -> tuple[str, float, bool]: ...


class CalculatorEnv:
    """The toy tool environment of the module docstring."""

    def reset(self, record: dict) -> str:
        self.answer = str(record["answer"])
        return record["prompt"]

    def step(self, completion: str) -> tuple[str, float, bool]:
        text = completion.strip()
        if "+" in text:
            try:
                value = sum(int(x) for x in text.split("+"))
            except ValueError:
                return "", 0.0, True  # a malformed call ends the episode
            return f"{value}=", 0.0, False
        return "", float(text == self.answer), True


BUILTIN = {"calculator": CalculatorEnv}


def resolve(name: str, key: str = "rl.env") -> Callable[[], Env]:
    """A built-in name or "pkg.module:Class" (called with no arguments per episode)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"{key}={name!r} must be one of {sorted(BUILTIN)} or 'pkg.module:Class'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={name!r} cannot be imported: {e}") from None


class Episodes(NamedTuple):
    ids_BW: np.ndarray
    valid_BW: np.ndarray
    mask_BT: np.ndarray  # [B, W-1] in the shifted frame: the policy's tokens only
    old_logp_BT: np.ndarray
    rewards_B: np.ndarray
    lengths_B: np.ndarray  # policy tokens per row
    truncated_B: np.ndarray  # a turn hit max_new_tokens without a stop, or the row is full
    errors: int  # environment steps that raised (scored 0, episode ended)


def run_episodes(
    sampler: Callable[[list[list[int]]], Any],
    make_env: Callable[[], Env],
    records: list[dict],
    tokenizer: Any,
    *,
    max_turns: int,
    max_new_tokens: int,
    width: int,
    eos: int,
    pad: int,
) -> Episodes:
    """One episode per record (module docstring). `sampler(contexts) -> (tokens_BN,
    lengths_B, logprobs_BN)` continues each context by up to max_new_tokens."""
    b = len(records)
    envs = [make_env() for _ in records]
    rows: list[list[int]] = []
    for env, rec in zip(envs, records, strict=True):
        rows.append(list(tokenizer.encode(env.reset(rec))))
    policy: list[list[tuple[int, float]]] = [[] for _ in range(b)]  # (position, logp)
    rewards = np.zeros(b, np.float32)
    truncated = np.zeros(b, bool)
    active = list(range(b))
    errors = 0
    for _ in range(max_turns):
        if not active:
            break
        tokens_BN, lengths_B, logp_BN = (np.asarray(x) for x in sampler([rows[i] for i in active]))
        still = []
        for k, i in enumerate(active):
            n = int(lengths_B[k])
            new = [int(t) for t in tokens_BN[k, :n]]
            if len(rows[i]) + n > width:
                truncated[i] = True
                continue
            for j in range(n):
                policy[i].append((len(rows[i]) + j, float(logp_BN[k, j])))
            rows[i] += new
            stopped = bool(new) and new[-1] == eos
            truncated[i] |= not stopped
            text = tokenizer.decode(new[:-1] if stopped else new)
            try:
                obs, r, done = envs[i].step(text)
                rewards[i] += float(r)
            except Exception:  # noqa: BLE001 - a user environment must not end the run
                errors, done, obs = errors + 1, True, ""
            obs_ids = list(tokenizer.encode(obs)) if obs and not done else []
            if not done and len(rows[i]) + len(obs_ids) < width:
                rows[i] += obs_ids
                still.append(i)
        active = still
    ids = np.full((b, width), pad, np.int32)
    valid = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width - 1), np.float32)
    old = np.zeros((b, width - 1), np.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        valid[i, : len(row)] = 1
        for pos, lp in policy[i]:
            mask[i, pos - 1] = 1.0
            old[i, pos - 1] = lp
    lengths = np.asarray([len(p) for p in policy], np.int32)
    return Episodes(ids, valid, mask, old, rewards, lengths, truncated, errors)
