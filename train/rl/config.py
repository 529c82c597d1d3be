"""The `rl` section of an RL config: keys, defaults, validation, the algorithm presets.

An RL config is a trainer config (train/config_schema.base_config: model, runtime, mesh,
optimizer, checkpoint, init, train.steps / seed / log_every) plus `rl`, documented below.
Fields left None take the value of `rl.algo`'s preset (train/rl/losses.py PRESETS); any can be
set. `validate` refuses a bad value naming the dotted key, before any compute.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from train import config_schema
from train.config_schema import ConfigValueError
from train.rl.advantages import KINDS as ADVANTAGES
from train.rl.losses import ALGOS, LOSS_AGGS, PRESETS

TASKS = ("addition", "digits", "jsonl")
TRUNCATED = ("penalty", "mask")


def rl_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            algo="grpo",  # "grpo" | "dapo" | "gspo": the preset of the None fields below
            # "addition" | "digits" (built in: tasks.py) | "jsonl" (prompts_path, eval_path)
            task="addition",
            prompts_path="",  # JSON lines {"prompt": ..., "answer": ..., "image": path?}
            eval_path="",  # held-out JSON lines (accuracy every eval_every steps)
            reward="exact_match",  # built-in name (rewards.py) or "pkg.module:fn"
            # the held-out evaluation's reward (accuracy = the fraction scoring >= 1), e.g.
            # exact_match while training on a shaped reward; "" = rl.reward
            eval_reward="",
            prompts_per_step=8,
            group_size=8,  # responses per prompt
            max_prompt_len=16,  # prompt tokens (image placeholders included); longer: refused
            # image prompts: at most this many patches per image (resized down to fit, as in
            # training: train/data/multimodal.py); every row's pixels are padded to it
            max_patches=64,
            max_new_tokens=8,
            temperature=1.0,
            top_p=1.0,
            num_iterations=1,  # passes over each step's rollouts
            num_minibatches=1,  # policy updates per pass
            # recompute old_logp with a forward pass (else generate's sampling log-probs; always
            # recomputed when temperature != 1)
            recompute_old_logp=False,
            beta=0.0,  # k3 KL coefficient; > 0 keeps a frozen reference copy of the params
            eps_low=config_dict.placeholder(float),
            eps_high=config_dict.placeholder(float),
            loss_agg=config_dict.placeholder(str),
            advantage=config_dict.placeholder(str),  # "grpo" | "drgrpo" | "rloo"
            dynamic_sampling=config_dict.placeholder(bool),  # DAPO: drop all-equal groups
            max_refills=4,  # dynamic sampling: extra generate calls per step at most
            overlong_shaping=config_dict.placeholder(bool),
            # DAPO's soft overlong punishment, in tokens: for max_new_tokens - overlong_buffer <
            # len <= max_new_tokens the reward gains (max_new_tokens - overlong_buffer - len) /
            # overlong_buffer; truncated responses (no stop token) get -1 or are masked
            overlong_buffer=4,
            truncated="penalty",  # "penalty" (-1) | "mask" (out of the loss)
            # multi-turn episodes: "" = single turn; "calculator" (built in) or
            # "pkg.module:Class" (train/rl/envs.py); at most max_turns completions per episode
            env="",
            max_turns=1,
            eval_every=10,  # held-out greedy exact-match accuracy; 0 = never
            eval_examples=200,
            mtp_lambda=0.0,  # MTP loss on the generated sequences (the drafter follows)
            # MoE only: every policy forward of a step's updates reuses the experts of the
            # rollout (recorded in a forward with the pre-update params; train/rl/replay.py)
            routing_replay=False,
            # rollouts by MTP speculative decoding, k drafts per step (qwen35_jax.generate's
            # num_draft_tokens: the same distribution; needs an MTP head); 0 = plain decoding
            num_draft_tokens=0,
        )
    )


def resolved(rl: ml_collections.ConfigDict) -> dict:
    """The rl keys with the preset's values filled in where None."""
    out = rl.to_dict()
    for key, value in PRESETS[rl.algo].items():
        if out.get(key) is None:
            out[key] = value
    return out


def _fail(key: str, value, expected: str) -> None:
    raise ConfigValueError(f"{key}={value!r} {expected}")


def validate(config: ml_collections.ConfigDict):
    """The trainer's checks, then the rl section's; returns the model config."""
    model = config_schema.validate(config)
    rl = config.rl
    if rl.algo not in ALGOS:
        _fail("rl.algo", rl.algo, f"must be one of {ALGOS}")
    if rl.task not in TASKS:
        _fail("rl.task", rl.task, f"must be one of {TASKS}")
    if rl.task == "jsonl" and not rl.prompts_path:
        _fail("rl.prompts_path", rl.prompts_path, "must be set for rl.task='jsonl'")
    for key in (
        "prompts_per_step",
        "max_prompt_len",
        "max_new_tokens",
        "num_iterations",
        "max_turns",
        "max_patches",
    ):
        if rl[key] < 1:
            _fail(f"rl.{key}", rl[key], "must be >= 1")
    if rl.group_size < 2:
        _fail("rl.group_size", rl.group_size, "must be >= 2 (group-relative advantages)")
    rows = rl.prompts_per_step * rl.group_size
    if rl.num_minibatches < 1 or rows % rl.num_minibatches:
        _fail("rl.num_minibatches", rl.num_minibatches, f"must divide the {rows} rollouts a step")
    for key in (
        "beta",
        "temperature",
        "max_refills",
        "eval_every",
        "eval_examples",
        "mtp_lambda",
        "num_draft_tokens",
    ):
        if rl[key] < 0:
            _fail(f"rl.{key}", rl[key], "must be >= 0")
    if not 0.0 < rl.top_p <= 1.0:
        _fail("rl.top_p", rl.top_p, "must be in (0, 1]")
    r = resolved(rl)
    if r["loss_agg"] not in LOSS_AGGS:
        _fail("rl.loss_agg", r["loss_agg"], f"must be one of {LOSS_AGGS}")
    if r["advantage"] not in ADVANTAGES:
        _fail("rl.advantage", r["advantage"], f"must be one of {ADVANTAGES}")
    for key in ("eps_low", "eps_high"):
        if not 0.0 <= r[key] < 1.0 + (key == "eps_high") * 1e9:
            _fail(f"rl.{key}", r[key], "must be >= 0 (and eps_low < 1)")
    if rl.truncated not in TRUNCATED:
        _fail("rl.truncated", rl.truncated, f"must be one of {TRUNCATED}")
    if r["overlong_shaping"] and not 0 < rl.overlong_buffer < rl.max_new_tokens:
        _fail("rl.overlong_buffer", rl.overlong_buffer, "must be in (0, rl.max_new_tokens)")
    if rl.mtp_lambda > 0 and not model.text_config.mtp_num_hidden_layers:
        _fail("rl.mtp_lambda", rl.mtp_lambda, "needs a model with an MTP head")
    if rl.routing_replay and not model.text_config.is_moe:
        _fail("rl.routing_replay", rl.routing_replay, "needs an MoE model (num_experts > 0)")
    if rl.num_draft_tokens > 0 and not model.text_config.mtp_num_hidden_layers:
        _fail("rl.num_draft_tokens", rl.num_draft_tokens, "needs a model with an MTP head")
    if rl.task == "digits" and model.vision_config is None:
        _fail("rl.task", rl.task, "needs a model with a vision_config (configs/digits.py)")
    if model.text_config.eos_token_id is None:
        _fail("model.text_config.eos_token_id", None, "must be set: rollouts stop at it")
    return model
