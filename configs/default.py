"""The embedded default: a tiny hybrid MoE Qwen3.5 with MTP, pretrained on the Python stdlib.

    python -m train.main --workdir=/tmp/run

Trains a 1024-piece sentencepiece tokenizer on ~3 MB of the standard library's own *.py files,
then pretrains a 4-layer hybrid model (3 Gated DeltaNet layers + 1 gated-attention layer, 4
experts top-2 with a shared expert, one MTP layer) on CPU in a few minutes, logging to the
console, metrics.jsonl and TensorBoard, checkpointing into the workdir, and finishing with
greedy completions of a few prompts. Rerun the same command to resume.
"""

from train.config_schema import base_config


def get_config():
    c = base_config("tiny-moe")
    t = c.model.text_config
    t.vocab_size = c.data.get_ref("vocab_size")
    t.hidden_size = 128
    t.num_hidden_layers = 4
    t.full_attention_interval = 4
    t.num_attention_heads = 4
    t.num_key_value_heads = 2
    t.head_dim = 32
    t.linear_num_key_heads = 2
    t.linear_num_value_heads = 4
    t.linear_key_head_dim = 32
    t.linear_value_head_dim = 32
    t.num_experts = 4
    t.num_experts_per_tok = 2
    t.moe_intermediate_size = 64
    t.shared_expert_intermediate_size = 128
    t.mtp_num_hidden_layers = 1
    t.tie_word_embeddings = True
    c.runtime.gdn_chunk_size = 32

    c.train.steps = 600
    c.train.batch_size = 8
    c.train.seq_len = 128
    c.train.log_every = 50
    c.train.mtp_lambda = 0.3
    c.train.prompts = ("def ", "import os\n", "class ", "    return ")
    c.train.completion_tokens = 24
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2
    c.optimizer.lr = 5e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.1
    c.mesh.fsdp = 1
    c.mesh.data = -1
    c.data.kind = "stdlib"
    c.data.max_bytes = 3_000_000
    c.data.vocab_size = 1024
    return c
