"""Pretraining for the RL demo: a tiny hybrid model learns two-digit addition (CPU, minutes).

    python -m train.main --config=configs/addition_pretrain.py --workdir=/tmp/addition_pretrain

The corpus (generated here, train/rl/tasks.py) writes "37+48=85" with the sum in its usual order
in a quarter of the documents and reversed ("37+48=58") in the others; one token per character.
Then RL teaches the model which form is right (configs/rl_addition.py):

    python -m train.rl --config=configs/rl_addition.py --workdir=/tmp/addition_rl
"""

from train.config_schema import base_config
from train.rl import tasks


def model_and_data(c):
    """The model and tokenizer shared by this file and configs/rl_addition.py."""
    paths = tasks.write_addition_files()
    t = c.model.text_config
    t.vocab_size = 16
    t.hidden_size = 64
    t.num_hidden_layers = 2
    t.full_attention_interval = 2
    t.num_attention_heads = 4
    t.num_key_value_heads = 2
    t.head_dim = 16
    t.linear_num_key_heads = 2
    t.linear_num_value_heads = 4
    t.linear_key_head_dim = 16
    t.linear_value_head_dim = 16
    t.intermediate_size = 192
    t.mtp_num_hidden_layers = 0
    t.tie_word_embeddings = True
    t.eos_token_id = 1
    t.pad_token_id = 0
    t.max_position_embeddings = 256
    c.runtime.gdn_chunk_size = 16
    c.data.kind = "jsonl"
    c.data.path = paths["corpus"]
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = paths["tokenizer"]
    c.mesh.fsdp = 1
    c.mesh.data = -1
    return c


def get_config():
    c = model_and_data(base_config("tiny"))
    c.train.steps = 1500
    c.train.batch_size = 32
    c.train.seq_len = 64
    c.train.log_every = 100
    c.train.mtp_lambda = 0.0
    c.train.prompts = ("37+48=", "12+9")
    c.train.completion_tokens = 4
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 1
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    return c
