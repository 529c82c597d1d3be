"""`python -m train.rl` on 2 real processes x 4 CPU devices (launch/local.sh, gloo) gives the
rewards, losses, KL and held-out accuracy of 1 process x 8 devices: rollouts from parameters
that span both processes (a tiny MoE, fsdp=2 x expert=4), the frozen KL reference, recomputed
old log-probs, two minibatches x two iterations, the held-out evaluation on every process.

Measured by hand with these flags (load average ~25 on 2 cores): ~80 CPU-s per process; rewards
identical, losses, KL and gradient norms within 3e-6 relative."""

import json
import pathlib

import pytest

from tests.test_multihost import run_local

FLAGS = [
    "--config=configs/rl_addition.py",
    "--config.init.from_checkpoint=",
    "--config.model.text_config.hidden_size=32",
    "--config.model.text_config.intermediate_size=64",
    "--config.model.text_config.num_experts=4",
    "--config.model.text_config.num_experts_per_tok=2",
    "--config.model.text_config.moe_intermediate_size=32",
    "--config.model.text_config.shared_expert_intermediate_size=32",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
    "--config.mesh.expert=4",
    "--config.rl.prompts_per_step=2",
    "--config.rl.group_size=4",
    "--config.rl.max_new_tokens=4",
    "--config.rl.num_minibatches=2",
    "--config.rl.num_iterations=2",
    "--config.rl.beta=0.05",
    "--config.rl.recompute_old_logp=True",
    "--config.rl.reward=tests.test_rl:length_reward",
    "--config.rl.eval_every=2",
    "--config.rl.eval_examples=8",
    "--config.optimizer.lr=1e-2",
    "--config.train.steps=2",
    "--config.checkpoint.every_steps=100",
]
KEYS = ("reward_mean", "reward_std", "response_len_mean", "loss", "pg_loss", "kl", "entropy")


def rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 3 processes compiling generate (twice), the log-probs and the update
def test_train_rl_two_processes_match_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    logs = run_local(2, 4, "train.rl", *FLAGS, f"--workdir={two}", logdir=tmp_path / "logs2")
    assert "mesh {'data': 1, 'fsdp': 2" in logs
    run_local(1, 8, "train.rl", *FLAGS, f"--workdir={one}", logdir=tmp_path / "logs1")
    got, want = rows(two), rows(one)
    assert [r["step"] for r in want] == [0, 1, 2]
    assert [r["step"] for r in got] == [0, 1, 2]
    assert got[0]["eval_accuracy"] == want[0]["eval_accuracy"]
    assert got[2]["eval_accuracy"] == want[2]["eval_accuracy"]
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["reward_mean"] > 0
        for key in KEYS:
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-7, (key, a, b)
    assert want[2]["kl"] > 0 and want[1]["loss"] != 0
