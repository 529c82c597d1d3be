"""A seconds-scale CPU run: 2-layer hybrid MoE with MTP on 300 kB of the stdlib (tests, smoke).

    python -m train.main --config=configs/tiny_cpu.py --workdir=/tmp/tiny

One block of 1 Gated DeltaNet + 1 gated-attention layer, width 32, 4 experts top-2 plus a shared
expert, one MTP layer, a 384-piece tokenizer. The tests run it through the CLI with overrides
(`--config.train.steps=6 ...`); pass `:dense` for the dense variant:

    python -m train.main --config=configs/tiny_cpu.py:dense --workdir=/tmp/tiny_dense
"""

from train.config_schema import base_config

VARIANTS = ("moe", "dense")  # train.main refuses any other `:variant`


def get_config(variant: str = "moe"):
    c = base_config("tiny-moe" if variant == "moe" else "tiny")
    t = c.model.text_config
    t.vocab_size = c.data.get_ref("vocab_size")
    t.hidden_size = 32
    t.num_hidden_layers = 2
    t.full_attention_interval = 2
    t.num_attention_heads = 2
    t.num_key_value_heads = 1
    t.head_dim = 16
    t.linear_num_key_heads = 1
    t.linear_num_value_heads = 2
    t.linear_key_head_dim = 16
    t.linear_value_head_dim = 16
    t.intermediate_size = 64
    if variant == "moe":
        t.num_experts = 4
        t.num_experts_per_tok = 2
        t.moe_intermediate_size = 32
        t.shared_expert_intermediate_size = 32
    t.mtp_num_hidden_layers = 1
    c.runtime.gdn_chunk_size = 16

    c.train.steps = 20
    c.train.batch_size = 4
    c.train.seq_len = 64
    c.train.log_every = 5
    c.train.prompts = ("def ",)
    c.train.completion_tokens = 8
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 5
    c.mesh.fsdp = 1
    c.mesh.data = -1
    c.data.max_bytes = 300_000
    c.data.vocab_size = 384
    return c
