"""RL on images raises held-out accuracy: the digits task (reward: the named digit is right).

A tiny pretraining made here (configs/digits_pretrain.py, fewer steps): scikit-learn's training
digits captioned with the right digit in a quarter of the documents and with the next digit in
the others, so the pretrained model sees the digit but greedily names the wrong one. A few GRPO
steps of `train.rl`'s loop (configs/rl_digits.py: image prompts through the processor,
`qwen35_jax.generate` and the policy's forward pass) raise the greedy accuracy on held-out
digits (the eval split: never in the corpus nor in the RL prompts) by a wide margin. The same
steps with a reward that ignores the answer (a fixed pseudo-random coin; the held-out accuracy
still scored by exact match, `rl.eval_reward`) do not: the rise comes from the reward, not from
the updates themselves.
"""

import itertools
import os
import runpy
import zlib

import pytest

from train.data import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_coin = itertools.count()


def coin_reward(prompt: str, completion: str, record: dict) -> float:
    """1 for a quarter of the calls, whatever the completion (deterministic in the call order)."""
    del prompt, completion, record
    return float(zlib.crc32(str(next(_coin)).encode()) % 4 == 0)


def test_digits_word_tokenizer_json_has_the_word_tokenizers_ids(tmp_path):
    """The pretraining's tokenizer.json and the RL loop's WordTokenizer give the same ids."""
    from train.data.tokenizers import WordTokenizer, load_tokenizer
    from train.rl import tasks

    path = tmp_path / "tokenizer.json"
    path.write_text(tasks.word_tokenizer_json(digits.WORDS))
    hf, word = load_tokenizer("hf", str(path)), WordTokenizer(digits.WORDS)
    text = "digit 7 digit 0 9"
    assert hf.encode(text) == word.encode(text) == [3, 11, 3, 4, 13]
    assert hf.eos_id == word.eos_id == 1
    assert hf.decode(word.encode("7")) == "7"
    shifted = [tasks.digits_caption(3, i) for i in range(400)]
    assert set(shifted) == {"digit 3", "digit 4"}
    assert 0.18 < shifted.count("digit 3") / 400 < 0.32


@pytest.mark.slow  # a pretraining and two RL runs: ~3 min of CPU (mostly compiling)
def test_rl_raises_held_out_digits_accuracy(tmp_path):
    pytest.importorskip("sklearn")
    from train import config_schema
    from train import loop as train_loop
    from train.rl import loop as rl_loop
    from train.rl.config import validate

    pre = runpy.run_path(os.path.join(ROOT, "configs", "digits_pretrain.py"))["get_config"]()
    pre.train.steps = pre.checkpoint.every_steps = 80
    pre.checkpoint.async_save = False
    config_schema.validate(pre)
    train_loop.run(pre, str(tmp_path / "pre"))

    def rl_run(name, **rl):
        c = runpy.run_path(os.path.join(ROOT, "configs", "rl_digits.py"))["get_config"]()
        c.init.from_checkpoint = str(tmp_path / "pre" / "checkpoints")
        c.train.steps = 8
        c.rl.eval_every = 8
        c.checkpoint.every_steps = 100
        c.checkpoint.async_save = False
        c.rl.update(**rl)
        validate(c)
        rows = rl_loop.run(c, str(tmp_path / name))["rows"]
        evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        assert [s for s, _ in evals] == [0, 8]
        return evals[0][1], evals[1][1], rows

    before, after, rows = rl_run("rl")
    assert before < 0.2, before  # the shifted caption wins before RL
    assert after >= before + 0.25, (before, after, [r.get("reward_mean") for r in rows])
    coin_before, coin_after, _ = rl_run(
        "coin", reward="tests.test_rl_digits:coin_reward", eval_reward="exact_match"
    )
    assert coin_before == before
    assert coin_after < before + 0.1, (before, coin_after)
