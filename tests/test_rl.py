"""RL fine-tuning (train/rl): a bandit learns, dynamic sampling refills and logs, overlong shaping
in tokens, a failing user reward scores 0 and is counted, 4 steps == 2 + resume + 2, 8 devices
(fsdp=4, expert=2) == one device, the CLI refuses bad keys, describes itself in --help, and saves
on SIGTERM and resumes from there."""

import math
import os
import runpy
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import runs
from tests.runs import env_fixture  # noqa: F401 (the `env` fixture)
from train.rl import rewards, rollout, tasks
from train.rl.advantages import group_advantages
from train.rl.config import resolved, rl_section
from train.rl.losses import policy_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# user rewards, passed by import path "tests.test_rl:<name>"
def length_reward(prompt, completion, record):
    return len(completion) / 6.0


def flaky_reward(prompt, completion, record):
    if completion.startswith("1"):
        raise RuntimeError("user bug")
    if completion.startswith("2"):
        return float("nan")
    return 1.0


def test_bandit_moves_probability_to_the_rewarded_arm():
    """Two arms, reward 1 for arm 1: GRPO steps on sampled groups raise p(arm 1) from 0.5."""
    theta = jnp.zeros(2)
    key = jax.random.key(0)

    def loss(theta, actions, old, adv):
        logp = jax.nn.log_softmax(theta)[actions][:, None]
        return policy_loss(logp, old, adv, jnp.ones_like(logp))[0]

    for i in range(15):
        actions = jax.random.categorical(jax.random.fold_in(key, i), theta, shape=(16,))
        old = jax.nn.log_softmax(theta)[actions][:, None]
        adv = group_advantages((actions == 1).astype(jnp.float32).reshape(2, 8)).reshape(-1)
        for _ in range(2):  # the ratio matters from the second update
            theta = theta - 0.5 * jax.grad(loss)(theta, actions, old, adv)
    assert float(jax.nn.softmax(theta)[1]) > 0.9


class FakeOut:
    """A GenerateOutput-like triple of host arrays."""

    def __init__(self, rows, texts, tok):
        n = 6
        self.tokens = np.zeros((len(rows), n), np.int32)
        self.lengths = np.zeros(len(rows), np.int32)
        for i, t in enumerate(texts):
            ids = tok.encode(t)[:n]
            ids = ids + [1] if len(ids) < n else ids  # eos unless truncated
            self.tokens[i, : len(ids)] = ids
            self.lengths[i] = len(ids)
        self.logprobs = np.full((len(rows), n), -0.5, np.float32)

    def __iter__(self):
        return iter((self.tokens, self.lengths, self.logprobs))


@pytest.fixture(scope="module")
def tok():
    from train.data.tokenizers import HFTokenizer

    return HFTokenizer(tasks.write_addition_files()["tokenizer"])


def _rl(**kw):
    rl = rl_section()
    rl.update(prompts_per_step=2, group_size=4, max_prompt_len=8, max_new_tokens=6, **kw)
    return resolved(rl)


def _task():
    return tasks.Task([tasks.addition_record(a, 10) for a in range(10, 20)], [], seed=0)


def test_dynamic_sampling_refills_and_logs(tok):
    calls = []

    def sampler(rows, attempt):
        calls.append(attempt)
        # attempt 0: every group all right (dropped); attempt 1: mixed groups (kept)
        texts = ["9"] * len(rows) if attempt == 0 else ["0", "9", "9", "9"] * (len(rows) // 4)
        return FakeOut(rows, texts, tok)

    reward = lambda p, c, r: float(c == "9")  # noqa: E731
    ro = rollout.collect(sampler, _task(), tok, reward, _rl(algo="dapo"), 0, eos=1, pad=0)
    assert calls == [0, 1]
    assert ro.dropped_frac == 0.5  # 2 of the 4 groups generated
    assert ro.rewards_B.tolist() == [0, 1, 1, 1] * 2
    # bounded: never mixed -> max_refills + 1 attempts, the dropped groups fill the batch
    calls.clear()
    rl = _rl(algo="dapo", max_refills=2)
    ro = rollout.collect(lambda r, a: sampler(r, 0), _task(), tok, reward, rl, 0, eos=1, pad=0)
    assert ro.attempts == 3 and ro.dropped_frac == 1.0 and len(ro.rewards_B) == 8
    # grpo: no dynamic sampling, one attempt
    ro = rollout.collect(lambda r, a: sampler(r, 0), _task(), tok, reward, _rl(), 0, 1, 0)
    assert ro.attempts == 1 and ro.dropped_frac == 0.0


def test_overlong_shaping_counts_tokens():
    rl = _rl(algo="dapo", overlong_buffer=4)  # L = 6, C = 4: penalty for 2 < len <= 6
    lengths = np.array([1, 2, 3, 5, 6, 6])
    truncated = np.array([False] * 5 + [True])
    r, keep = rollout.shape_rewards(np.ones(6), lengths, truncated, rl)
    np.testing.assert_allclose(r, [1, 1, 1 - 1 / 4, 1 - 3 / 4, 1 - 4 / 4, -1])
    assert keep.all()
    rl["truncated"] = "mask"
    r, keep = rollout.shape_rewards(np.ones(6), lengths, truncated, rl)
    assert keep.tolist() == [True] * 5 + [False] and r[4] == 0.0
    r, _ = rollout.shape_rewards(np.ones(6), lengths, truncated, _rl())  # grpo: off
    np.testing.assert_array_equal(r, 1.0)


def test_truncated_rows_leave_the_loss_when_masked(tok):
    rl = _rl(algo="dapo", truncated="mask", dynamic_sampling=False)
    texts = ["12", "1234567", "1", "99"] * 2  # row 1 is cut at 6 tokens without eos
    ro = rollout.collect(
        lambda r, a: FakeOut(r, texts, tok), _task(), tok, rewards.exact_match, rl, 0, eos=1, pad=0
    )
    assert ro.truncated_B.tolist() == [False, True, False, False] * 2
    assert ro.mask_BT[1].sum() == 0 and ro.mask_BT[0].sum() == 3  # "12" + eos


def test_user_reward_failures_score_zero_and_are_counted(tok):
    fn = rewards.resolve("tests.test_rl:flaky_reward")
    got, failures = rewards.score(fn, ["p"] * 3, ["1", "2", "3"], [{}] * 3)
    assert got == [0.0, 0.0, 1.0] and failures == 2
    texts = ["1", "2", "3", "4"] * 2
    ro = rollout.collect(lambda r, a: FakeOut(r, texts, tok), _task(), tok, fn, _rl(), 0, 1, 0)
    assert ro.reward_errors == 4 and ro.raw_rewards_B.tolist() == [0, 0, 1, 1] * 2
    with pytest.raises(ValueError, match="rl.reward"):
        rewards.resolve("no_such_module:fn")
    with pytest.raises(ValueError, match="rl.reward"):
        rewards.resolve("unknown")


def test_builtin_rewards():
    assert rewards.exact_match("", " 42 ", {"answer": "42"}) == 1.0
    assert rewards.math_answer("", "so x = 3, \\boxed{1,234}", {"answer": "1234"}) == 1.0
    assert rewards.math_answer("", "2 apples then 18", {"answer": "18"}) == 1.0
    assert rewards.math_answer("", "17", {"answer": "18"}) == 0.0
    assert rewards.format_reward("", "\\boxed{\\frac{1}{2}}", {}) == 1.0
    assert rewards.last_boxed("a \\boxed{x{y}} b") == "x{y}"


def test_rollout_layout_marks_exactly_the_completion():
    ids, valid, mask, old = rollout.layout(
        [[5, 6, 7], [5]],
        np.array([[8, 9, 1], [4, 1, 0]]),
        np.array([3, 2]),
        np.array([[-1, -2, -3], [-4, -5, 0]], np.float32),
        width=6,
        pad=0,
    )
    assert ids.tolist() == [[5, 6, 7, 8, 9, 1], [5, 4, 1, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert old.tolist() == [[0, 0, -1, -2, -3], [-4, -5, 0, 0, 0]]
    assert valid.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def tiny_rl_config(**rl):
    c = runpy.run_path(os.path.join(ROOT, "configs", "rl_addition.py"))["get_config"]()
    c.init.from_checkpoint = ""
    t = c.model.text_config
    t.hidden_size, t.intermediate_size = 32, 64
    t.num_experts, t.num_experts_per_tok = 4, 2
    t.moe_intermediate_size, t.shared_expert_intermediate_size = 32, 32
    c.rl.update(
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=4,
        eval_every=3,
        eval_examples=8,
        reward="tests.test_rl:length_reward",
        num_minibatches=2,
        num_iterations=2,
        **rl,
    )
    c.train.steps = 6
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    c.optimizer.lr = 1e-2
    return c


def _trace(rows):
    return [(r["step"], r.get("reward_mean"), r.get("loss"), r.get("eval_accuracy")) for r in rows]


@pytest.mark.slow
def test_rl_resume_is_exact(tmp_path):
    from train.rl import loop

    c = tiny_rl_config()
    # 2 steps on each side of the resume (an evaluation and a checkpoint at step 2)
    c.rl.eval_every, c.checkpoint.every_steps = 2, 2
    c.train.steps = 4
    straight = loop.run(c, str(tmp_path / "a"))["rows"]
    c.train.steps = 2
    first = loop.run(c, str(tmp_path / "b"))["rows"]
    c.train.steps = 4
    second = loop.run(c, str(tmp_path / "b"))
    assert second["start_step"] == 2
    assert _trace(first + second["rows"]) == _trace(straight)
    assert straight[0]["step"] == 0 and "eval_accuracy" in straight[0]  # before any update
    assert any(r.get("loss", 0) != 0 for r in straight)
    assert all(math.isfinite(r["loss"]) for r in straight[1:])


@pytest.mark.slow
def test_rl_step_on_8_devices_equals_one(tmp_path):
    """DAPO with a KL reference, recomputed old log-probs and the MTP loss on the generated
    tokens: 8 devices (fsdp=4, expert=2) give the rewards and losses of one device."""
    from train.rl import loop

    assert jax.device_count() == 8
    c = tiny_rl_config(algo="dapo", beta=0.05, recompute_old_logp=True, mtp_lambda=0.2)
    c.model.text_config.mtp_num_hidden_layers = 1
    c.train.steps, c.rl.eval_every = 2, 0
    c.mesh.update(data=1, fsdp=1, expert=1)
    one = loop.run(c, str(tmp_path / "one"), devices=jax.devices()[:1])["rows"]
    c.mesh.update(data=1, fsdp=4, expert=2)
    eight = loop.run(c, str(tmp_path / "eight"))["rows"]
    assert [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, eight, strict=True):
        assert a["reward_mean"] == b["reward_mean"]
        for key in ("loss", "kl", "mtp_loss", "pg_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert one[1]["kl"] > 0 and one[1]["mtp_loss"] > 0


def test_cli_refuses_bad_keys_before_compute(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    for arg, want in [
        ("--config.rl.algoo=dapo", "unknown config key 'rl.algoo'; did you mean rl.algo?"),
        ("--config.rl.group_size=1", "rl.group_size=1 must be >= 2"),
    ]:
        p = subprocess.run(
            [sys.executable, "-m", "train.rl", f"--workdir={tmp_path}", arg, "--check_config"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        assert p.returncode != 0 and want in p.stderr, (arg, p.stderr)
        assert "Traceback" not in p.stderr


def test_cli_help_describes_train_rl_and_lists_the_rl_keys():
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run(
        [sys.executable, "-m", "train.rl", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("RL fine-tuning entry point"), lines[:3]
    assert "Pretraining" not in p.stdout
    assert "Config keys (defaults of configs/rl_addition.py):" in lines
    for line in ("  [rl]", "    --config.rl.algo='grpo'", "    --config.rl.group_size=8"):
        assert line in lines, p.stdout[:3000]
    assert "    --config.rl.eps_high=None" in lines  # a preset key; the presets are listed
    assert any(x.strip().startswith("dapo: eps_low=0.2, eps_high=0.28") for x in lines)


@pytest.mark.slow  # two CLI runs, each compiling generate and the update (~40 s each, loaded)
def test_cli_sigterm_saves_exits_cleanly_and_resume_continues(tmp_path, env):
    workdir = tmp_path / "run"
    rl_addition = os.path.join(ROOT, "configs", "rl_addition.py")
    tiny = [  # a random 2-layer model, 8 rollouts of 4 tokens a step: steps of milliseconds
        "--config.init.from_checkpoint=",
        "--config.model.text_config.hidden_size=32",
        "--config.model.text_config.intermediate_size=64",
        "--config.rl.prompts_per_step=2",
        "--config.rl.group_size=4",
        "--config.rl.max_new_tokens=4",
        "--config.rl.eval_every=0",
        "--config.checkpoint.every_steps=100000",
    ]
    proc = runs.start(
        workdir,
        *tiny,
        "--config.train.steps=100000",
        env=env,
        config=rl_addition,
        module="train.rl",
    )
    runs.wait_for(proc, lambda: len(runs.logged_steps(workdir)) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    (saved,) = runs.steps_on_disk(workdir)
    assert f"preempted: checkpoint saved at step {saved}; rerun" in out, out[-2000:]
    # every step taken was logged and is in the checkpoint
    assert runs.logged_steps(workdir) == list(range(1, saved + 1))

    cmd = runs.command(
        workdir, *tiny, f"--config.train.steps={saved + 1}", config=rl_addition, module="train.rl"
    )
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {saved}" in r.stdout
    assert runs.steps_on_disk(workdir) == [saved, saved + 1]
    assert runs.logged_steps(workdir)[-1] == saved + 1


@pytest.mark.parametrize(
    ("key", "value", "want"),
    [
        ("algo", "ppo", "rl.algo='ppo' must be one of"),
        ("num_minibatches", 3, "rl.num_minibatches=3 must divide the 64 rollouts"),
        ("loss_agg", "sum", "rl.loss_agg='sum'"),
        ("top_p", 0.0, "rl.top_p=0.0"),
        ("mtp_lambda", 0.1, "rl.mtp_lambda=0.1 needs a model with an MTP head"),
    ],
)
def test_rl_config_refusals_name_the_key(key, value, want):
    from train.config_schema import ConfigValueError
    from train.rl.config import validate

    c = runpy.run_path(os.path.join(ROOT, "configs", "rl_addition.py"))["get_config"]()
    c.rl[key] = value
    with pytest.raises(ConfigValueError, match=want.replace("(", r"\(")):
        validate(c)
