"""Reward functions: built in by name, or any function by import path ("pkg.module:fn").

A reward is called as `fn(prompt: str, completion: str, record: dict) -> float` (`record` is the
task's record: "answer" and anything else it holds). Built in:

    exact_match     1 if the completion, stripped, equals record["answer"] (stripped), else 0
    math            1 if the last \\boxed{...} of the completion, or else its last number,
                    equals record["answer"] as a number (GSM8K-style solutions), else 0
    format          1 if the completion holds a \\boxed{...} answer, else 0

`score` never fails: a user reward that raises or returns NaN / a non-number scores 0, and the
number of such failures is returned with the scores (logged as `reward_errors`).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[str, str, dict], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(prompt: str, completion: str, record: dict) -> float:
    del prompt
    return float(completion.strip() == str(record.get("answer", "")).strip())


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _as_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def math_answer(prompt: str, completion: str, record: dict) -> float:
    del prompt
    boxed = last_boxed(completion)
    got = _as_number(boxed if boxed is not None else completion)
    want = _as_number(str(record.get("answer", "")))
    return float(got is not None and want is not None and abs(got - want) < 1e-6)


def format_reward(prompt: str, completion: str, record: dict) -> float:
    del prompt, record
    return float(last_boxed(completion) is not None)


BUILTIN: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math": math_answer,
    "format": format_reward,
}


def resolve(name: str, key: str = "rl.reward") -> RewardFn:
    """A built-in name or "pkg.module:fn"; ValueError naming `key` when it cannot be found."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(
            f"{key}={name!r} must be one of {sorted(BUILTIN)} or an import path 'pkg.module:fn'"
        )
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"{key}={name!r} is not callable")
    return fn


def score(
    fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]
) -> tuple[list[float], int]:
    """(rewards, failures): a call that raises or gives a non-finite number scores 0."""
    out, failures = [], 0
    for p, c, r in zip(prompts, completions, records, strict=True):
        try:
            value = float(fn(p, c, r))
            if not math.isfinite(value):
                raise ValueError("not finite")
        except Exception:  # noqa: BLE001 - a user reward must never end the run
            value, failures = 0.0, failures + 1
        out.append(value)
    return out, failures
