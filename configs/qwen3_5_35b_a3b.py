"""Pretraining qwen3.5-35b-a3b from scratch: 4M tokens per step, 400B tokens.

    python -m train.main --config=configs/qwen3_5_35b_a3b.py \
        --workdir=/mnt/shared/runs/qwen3_5_35b_a3b \
        --config.data.path='/gcs/BUCKET/data/train-*.array_record' \
        --config.data.tokenizer_path=/path/to/Qwen3.5-checkpoint-dir

Sized for a TPU v5p-256 (128 chips): fsdp 16 x expert 8.
Memory per chip on v5p-256: the TPU compiler's 63.0 GiB of 95.7 (66%, fits; `launch.compile
--topology=v5p-256`, libtpu 0.0.42.1, recompiled after session 7's fixes: bench/RESULTS.md),
the planner's 48.6 GiB (1.30x: the backend temporaries it cannot see, RESULTS).
Shared recipe (WSD, bfloat16, MTP, z-loss, Qwen tokenizer; continuing from released
weights): see `configs.common.pretrain_config`.
"""

from configs.common import pretrain_config


def get_config():
    c = pretrain_config(
        "qwen3.5-35b-a3b",
        steps=100_000,
        batch_size=1024,
        seq_len=4096,
        lr=0.0004,
        warmup_steps=2000,
        mesh={"fsdp": -1, "expert": 8},
    )
    c.train.grad_accum = 2  # micro-batches per step: the activations of 1/2 of the rows
    c.runtime.moe_capacity_factor = 1.25  # static all-to-all buffers (dropped rows counted)
    return c
