"""RL on images: the tiny VL model of configs/digits.py names the digit it sees (GRPO, CPU).

    python -m train.main --config=configs/digits_pretrain.py --workdir=/tmp/digits_pretrain
    python -m train.rl --config=configs/rl_digits.py --workdir=/tmp/digits_rl

The prompt is the training documents' start, [image, "digit"] (vision_start, 4 placeholders,
vision_end, "digit": the processor and the per-row pixels of training, train/rl/prompts.py);
the model's completion ("7", eos) earns 1 when it names the right digit (exact match). Held-out
greedy accuracy on digits never trained on (the eval split) every rl.eval_every steps.
The pretraining (configs/digits_pretrain.py) captions a quarter of its images with the right
digit and the others with the next one, so its greedy answer is mostly wrong; RL raises the
held-out accuracy (README, "RL fine-tuning"; tests/test_rl_digits.py).
Another pretraining workdir: --config.init.from_checkpoint=DIR/checkpoints.
"""

import os
import runpy
import tempfile

from train.rl.config import rl_section

_here = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = runpy.run_path(os.path.join(_here, "digits.py"))["get_config"]()
    c.model.text_config.eos_token_id = 1  # the word tokenizer's <eos> (rollouts stop there)
    c.model.text_config.pad_token_id = 0
    c.rl = rl_section()
    c.rl.task = "digits"
    c.rl.reward = "exact_match"
    c.rl.prompts_per_step = 16
    c.rl.group_size = 8
    c.rl.max_prompt_len = 8
    c.rl.max_new_tokens = 2
    c.rl.max_patches = 16  # a 32 x 32 digit: 16 patches of 8 x 8 px
    c.rl.eval_every = 2
    c.rl.eval_examples = 200
    c.train.steps = 10
    c.train.seed = 0
    c.checkpoint.every_steps = 5
    c.checkpoint.keep = 2
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "wsd"
    c.optimizer.decay_fraction = 0.3
    c.optimizer.weight_decay = 0.0
    c.init.from_checkpoint = os.path.join(tempfile.gettempdir(), "digits_pretrain", "checkpoints")
    return c
