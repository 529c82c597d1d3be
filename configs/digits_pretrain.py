"""Pretraining for the digits RL demo: configs/digits.py's tiny VL model on captions that name
the right digit in only a quarter of the images (CPU, about a minute).

    python -m train.main --config=configs/digits_pretrain.py --workdir=/tmp/digits_pretrain
    python -m train.rl --config=configs/rl_digits.py --workdir=/tmp/digits_rl

The corpus (generated here, train/rl/tasks.py `write_digits_files`) is scikit-learn's 1,500
training digits as PNG files with JSON-lines captions: "digit 7" for a quarter of the images and
"digit 8" (the next digit, mod 10) for the others, the same word tokenizer as configs/digits.py.
The pretrained model sees the digit and knows both captions; its greedy caption is mostly the
shifted one. RL, rewarding the right digit only, teaches it which is right, as the addition demo
does with reversed sums (configs/addition_pretrain.py). The held-out digits (the eval split) are
never in this corpus.
"""

import os
import runpy

from train.rl import tasks

_here = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = runpy.run_path(os.path.join(_here, "digits.py"))["get_config"]()
    paths = tasks.write_digits_files(image_size=c.data.image_size)
    c.data.kind = "image_jsonl"
    c.data.path = paths["corpus"]
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = paths["tokenizer"]
    c.data.eval_examples = 0
    c.model.text_config.eos_token_id = 1
    c.model.text_config.pad_token_id = 0
    c.train.steps = 80
    c.train.log_every = 20
    c.checkpoint.every_steps = 80
    c.checkpoint.keep = 1
    c.optimizer.warmup_steps = 10
    return c
