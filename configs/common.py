"""The shared pod pretraining recipe of the configs/qwen3_5_*.py files (big_vision's pattern:
recipes live with the configs; train/config_schema.py keeps only keys, defaults and validation).
"""

from __future__ import annotations

import math

import ml_collections

from train.config_schema import base_config


def pretrain_config(
    preset: str,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup_steps: int,
    mesh: dict[str, int],
    remat_policy: str = "dots_no_batch",
) -> ml_collections.ConfigDict:
    """A pod pretraining config for a released preset: bfloat16 compute with float32 params and
    optimizer state, WSD schedule (10% decay), Qwen's own tokenizer (`data.tokenizer_path`: a
    directory holding its tokenizer.json), ArrayRecord data (`data.path` must be given), MTP
    loss weight 0.3, z-loss 1e-4, remat of non-batch dots, the heads' cross-entropies over
    chunks of 1024 positions (`train.loss_chunk`: no [B, T, vocab] logits in memory).

    The `fsdp: -1` mesh axis absorbs whatever devices are present; keep `train.batch_size`
    divisible by the batch-sharding axes (data x fsdp x expert). The workdir must be a path
    shared by all hosts. To continue from released weights instead of starting from scratch,
    add `--config.init.from_hf=/path/to/checkpoint-dir` (or `init.from_checkpoint` for a
    converted orbax checkpoint)."""
    c = base_config(preset)
    c.runtime.compute_dtype = "bfloat16"
    c.runtime.remat_policy = remat_policy
    c.train.update(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        log_every=50,
        mtp_lambda=0.3,
        z_loss=1e-4,
        completion_tokens=0,
        loss_chunk=1024,
    )
    c.optimizer.update(
        lr=lr,
        schedule="wsd",
        warmup_steps=warmup_steps,
        decay_fraction=0.1,
        min_lr_ratio=0.01,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
    )
    c.checkpoint.update(every_steps=1000, keep=3)
    c.mesh.update(data=1, fsdp=1, tensor=1, expert=1, sequence=1)
    c.mesh.update(mesh)
    c.data.update(
        # 64 fixed virtual shards: up to 64 hosts each read only their own rows (more hosts
        # share shards); the batches stay those of any other host count, so a run resumes on
        # another topology
        num_shards=math.gcd(batch_size, 64),
        kind="arrayrecord",
        path="",
        record_format="json",
        text_key="text",
        tokenizer="hf",
        tokenizer_path="",
        read_threads=16,
    )
    return c
