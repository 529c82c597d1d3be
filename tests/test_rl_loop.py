"""The RL loop end to end (train.rl.loop.run, tiny models): speculative rollouts
(rl.num_draft_tokens) are the plain rollouts when greedy; rl.mtp_lambda > 0 makes the MTP
drafter follow the policy (its loss on the generated tokens falls, its acceptance rises, where
mtp_lambda = 0 leaves it); a user reward and a multi-turn user environment given by import path
run through the full loop, the environment's tokens outside the loss mask (and so the ratio)."""

import numpy as np
import pytest

from tests.test_rl import tiny_rl_config
from train.rl import loop, rollout

REWARD_CALLS: list[tuple[str, str]] = []


def counting_reward(prompt, completion, record):
    """A user reward ("tests.test_rl_loop:counting_reward") that records its calls."""
    REWARD_CALLS.append((prompt, completion))
    return float(len(completion) % 3 == 1)


class ToolEnv:
    """A user environment ("tests.test_rl_loop:ToolEnv"): the first completion is answered by
    the observation OBS, the second ends the episode with reward len(completion) / 4."""

    OBS = "12="
    made: list["ToolEnv"] = []

    def __init__(self):
        self.completions: list[str] = []
        ToolEnv.made.append(self)

    def reset(self, record):
        self.prompt = record["prompt"]
        return self.prompt

    def step(self, completion):
        self.completions.append(completion)
        if len(self.completions) == 1:
            return self.OBS, 0.0, False
        return "", len(completion) / 4, True


@pytest.fixture
def collected(monkeypatch):
    """Every Rollouts the loop collects, in order."""
    seen = []
    collect = rollout.collect

    def spy(*args, **kwargs):
        seen.append(collect(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loop.rollout, "collect", spy)
    return seen


def mtp_config(**rl):
    c = tiny_rl_config()
    c.rl.update(temperature=0.0, eval_every=0, **rl)
    t = c.model.text_config
    t.num_experts, t.num_experts_per_tok, t.mtp_num_hidden_layers = 0, 0, 1
    t.moe_intermediate_size = t.shared_expert_intermediate_size = 0
    c.train.steps = 4
    c.checkpoint.every_steps = 100
    return c


@pytest.mark.slow  # three 4-step runs, two of them compiling speculative generate
def test_speculative_rollouts_and_the_drafter_following_the_policy(tmp_path, collected):
    REWARD_CALLS.clear()
    plain = loop.run(mtp_config(reward="tests.test_rl_loop:counting_reward"), str(tmp_path / "a"))
    plain_ids = [ro.ids_BW for ro in collected]
    # the user reward ran on every rollout, its values are the logged rewards
    assert len(REWARD_CALLS) == 4 * 8
    got = [r["raw_reward_mean"] for r in plain["rows"]]
    want = [
        np.mean([len(c) % 3 == 1 for _, c in REWARD_CALLS[8 * i : 8 * i + 8]]) for i in range(4)
    ]
    np.testing.assert_allclose(got, want)

    collected.clear()
    spec = loop.run(
        mtp_config(reward="tests.test_rl_loop:counting_reward", num_draft_tokens=2),
        str(tmp_path / "b"),
    )["rows"]
    for a, b in zip(plain_ids, [ro.ids_BW for ro in collected], strict=True):
        np.testing.assert_array_equal(a, b)  # greedy: the same rollouts
    assert [r["reward_mean"] for r in spec] == [r["reward_mean"] for r in plain["rows"]]
    assert all("draft_acceptance" in r for r in spec)

    follow = loop.run(mtp_config(num_draft_tokens=2, mtp_lambda=1.0), str(tmp_path / "c"))["rows"]
    acc_off = [r["draft_acceptance"] for r in spec]
    acc_on = [r["draft_acceptance"] for r in follow]
    mtp = [r["mtp_loss"] for r in follow]
    assert mtp[-1] < 0.7 * mtp[0], mtp
    assert acc_on[-1] > acc_on[0] + 0.2, acc_on
    assert abs(acc_off[-1] - acc_off[0]) < 0.1, acc_off  # mtp_lambda = 0: the drafter stays


@pytest.mark.slow  # compiles generate for 3 turns of episodes and the update
def test_user_environment_through_the_loop_masks_its_tokens(tmp_path, collected):
    from train.data.tokenizers import HFTokenizer
    from train.rl import tasks

    tok = HFTokenizer(tasks.write_addition_files()["tokenizer"])
    ToolEnv.made.clear()
    c = tiny_rl_config()
    c.rl.update(env="tests.test_rl_loop:ToolEnv", max_turns=2, eval_every=0)
    c.train.steps = 2
    rows = loop.run(c, str(tmp_path / "env"))["rows"]
    assert len(ToolEnv.made) == 2 * 8 and len(collected) == 2
    obs = tok.encode(ToolEnv.OBS)
    for step, ro in enumerate(collected):
        envs = ToolEnv.made[8 * step : 8 * step + 8]
        np.testing.assert_allclose(
            ro.rewards_B,
            [len(e.completions[-1]) / 4 if len(e.completions) == 2 else 0 for e in envs],
        )
        for b, e in enumerate(envs):
            valid = ro.valid_BW[b].astype(bool)
            policy = np.zeros_like(valid)
            policy[1:] = ro.mask_BT[b] > 0  # mask[j] marks token j + 1
            ids = ro.ids_BW[b]
            context = ids[valid & ~policy].tolist()
            want = tok.encode(e.prompt) + (obs if len(e.completions) == 2 else [])
            assert context == want, (step, b)  # prompt and observation: never in the mask
            texts = tok.decode([t for t in ids[policy].tolist() if t != 1])
            assert texts == "".join(e.completions)  # the policy's tokens: all in the mask
            assert np.all(ro.old_logp_BT[b][ro.mask_BT[b] == 0] == 0)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward_mean"] == pytest.approx(float(np.mean(collected[0].rewards_B)))
    assert all(np.isfinite(r["loss"]) for r in rows)
