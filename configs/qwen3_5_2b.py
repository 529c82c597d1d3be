"""Pretraining qwen3.5-2b from scratch: 2M tokens per step, 200B tokens.

    python -m train.main --config=configs/qwen3_5_2b.py \
        --workdir=/mnt/shared/runs/qwen3_5_2b \
        --config.data.path='/gcs/BUCKET/data/train-*.array_record' \
        --config.data.tokenizer_path=/path/to/Qwen3.5-checkpoint-dir

Sized for a TPU v5p-64 (32 chips) or four 8-GPU nodes.
Memory per chip on v5p-64: the TPU compiler's 72.0 GiB of 95.7 (76%, fits; `launch.compile
--topology=v5p-64`, libtpu 0.0.42.1, recompiled after session 7's fixes, bench/RESULTS.md),
the planner's 55.6 GiB (compiler / planner 1.29).
Shared recipe (WSD, bfloat16, MTP, z-loss, Qwen tokenizer; continuing from released
weights): see `configs.common.pretrain_config`.
"""

from configs.common import pretrain_config


def get_config():
    c = pretrain_config(
        "qwen3.5-2b",
        steps=100_000,
        batch_size=512,
        seq_len=4096,
        lr=0.0006,
        warmup_steps=2000,
        mesh={"fsdp": -1},
    )
    c.train.grad_accum = 2  # micro-batches per step: the activations of 1/2 of the rows
    return c
