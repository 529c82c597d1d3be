"""Pretraining qwen3.5-4b from scratch: 2M tokens per step, 200B tokens.

    python -m train.main --config=configs/qwen3_5_4b.py \
        --workdir=/mnt/shared/runs/qwen3_5_4b \
        --config.data.path='/gcs/BUCKET/data/train-*.array_record' \
        --config.data.tokenizer_path=/path/to/Qwen3.5-checkpoint-dir

Sized for a TPU v5p-128 (64 chips).
Memory per chip on v5p-128: the TPU compiler's 57.5 GiB of 95.7 (60%, fits; `launch.compile
--topology=v5p-128`, libtpu 0.0.42.1, recompiled after session 7's fixes: bench/RESULTS.md),
the planner's 52.3 GiB (1.10x).
Shared recipe (WSD, bfloat16, MTP, z-loss, Qwen tokenizer; continuing from released
weights): see `configs.common.pretrain_config`.
"""

from configs.common import pretrain_config


def get_config():
    c = pretrain_config(
        "qwen3.5-4b",
        steps=100_000,
        batch_size=512,
        seq_len=4096,
        lr=0.0004,
        warmup_steps=2000,
        mesh={"fsdp": -1},
    )
    c.train.grad_accum = 2  # micro-batches per step: the activations of 1/2 of the rows
    return c
