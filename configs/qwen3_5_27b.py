"""Pretraining qwen3.5-27b from scratch: 4M tokens per step, 400B tokens.

    python -m train.main --config=configs/qwen3_5_27b.py \
        --workdir=/mnt/shared/runs/qwen3_5_27b \
        --config.data.path='/gcs/BUCKET/data/train-*.array_record' \
        --config.data.tokenizer_path=/path/to/Qwen3.5-checkpoint-dir

Sized for a TPU v5p-512 (256 chips): fsdp 64 x tensor 4.
Memory per chip on v5p-512: the TPU compiler's 45.0 GiB of 95.7 (47%, fits; `launch.compile
--topology=v5p-512`, libtpu 0.0.42.1, recompiled after session 7's fixes, bench/RESULTS.md),
the planner's 38.3 GiB (1.17x; session 8 split the model-width activations over tensor, as the
compiler's buffer assignment keeps them).
Shared recipe (WSD, bfloat16, MTP, z-loss, Qwen tokenizer; continuing from released
weights): see `configs.common.pretrain_config`.
"""

from configs.common import pretrain_config


def get_config():
    c = pretrain_config(
        "qwen3.5-27b",
        steps=100_000,
        batch_size=1024,
        seq_len=4096,
        lr=0.0002,
        warmup_steps=2000,
        mesh={"fsdp": -1, "tensor": 4},
    )
    c.train.grad_accum = 4  # micro-batches per step: the activations of 1/4 of the rows
    return c
