"""Pretraining qwen3.5-397b-a17b from scratch: 16M tokens per step, 1.6T tokens.

    python -m train.main --config=configs/qwen3_5_397b_a17b.py \
        --workdir=/mnt/shared/runs/qwen3_5_397b_a17b \
        --config.data.path='/gcs/BUCKET/data/train-*.array_record' \
        --config.data.tokenizer_path=/path/to/Qwen3.5-checkpoint-dir

Sized for a TPU v5p-2048 (1024 chips): fsdp 16 x tensor 2 x expert 32.
Memory per chip on v5p-2048: the TPU compiler's 57.9 GiB of 95.7 (60%, fits; `launch.compile
--topology=v5p-2048`, libtpu 0.0.42.1, recompiled after session 7's fixes: bench/RESULTS.md),
the planner's 44.2 GiB (1.31x: the backend temporaries it cannot see, RESULTS).
Shared recipe (WSD, bfloat16, MTP, z-loss, Qwen tokenizer; continuing from released
weights): see `configs.common.pretrain_config`.
"""

from configs.common import pretrain_config


def get_config():
    c = pretrain_config(
        "qwen3.5-397b-a17b",
        steps=100_000,
        batch_size=4096,
        seq_len=4096,
        lr=0.00015,
        warmup_steps=2000,
        mesh={"fsdp": -1, "expert": 32, "tensor": 2},
    )
    c.train.grad_accum = 4  # micro-batches per step: the activations of 1/4 of the rows
    c.runtime.moe_capacity_factor = 1.25  # static all-to-all buffers (dropped rows counted)
    return c
