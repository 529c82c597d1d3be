"""RL on the built-in addition task (GRPO), from configs/addition_pretrain.py's checkpoint.

    python -m train.main --config=configs/addition_pretrain.py --workdir=/tmp/addition_pretrain
    python -m train.rl --config=configs/rl_addition.py --workdir=/tmp/addition_rl

Reward: exact match of the sum; held-out greedy accuracy (pairs never trained on) every
rl.eval_every steps in metrics.jsonl. Another pretraining workdir:
--config.init.from_checkpoint=DIR/checkpoints. Other algorithms: --config.rl.algo=dapo|gspo.
"""

import os
import tempfile

from train.config_schema import base_config
from train.rl.config import rl_section

_here = os.path.dirname(os.path.abspath(__file__))
_pretrain = __import__("runpy").run_path(os.path.join(_here, "addition_pretrain.py"))


def get_config():
    c = _pretrain["model_and_data"](base_config("tiny"))
    c.rl = rl_section()
    c.rl.task = "addition"
    c.rl.reward = "exact_match"
    c.rl.prompts_per_step = 8
    c.rl.group_size = 8
    c.rl.max_prompt_len = 8
    c.rl.max_new_tokens = 6
    c.rl.overlong_buffer = 2  # dapo: answers of 5-6 tokens (with eos) lose reward
    c.rl.eval_every = 5
    c.rl.eval_examples = 200
    c.train.steps = 50
    c.train.seed = 0
    c.checkpoint.every_steps = 25
    c.checkpoint.keep = 2
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "wsd"
    c.optimizer.decay_fraction = 0.0
    c.optimizer.weight_decay = 0.0
    c.init.from_checkpoint = os.path.join(tempfile.gettempdir(), "addition_pretrain", "checkpoints")
    return c
