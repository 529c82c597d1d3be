"""Analytic FLOPs: the dense count against 6 * N * tokens, MoE counts only active experts
(TensorBoard files: tests/test_tensorboard.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import traverse_util

import qwen35_jax
from train import flops


def matmul_params(cfg) -> int:
    """Parameters that are matmul weights (no norms, gates, conv taps, embedding lookup)."""
    flat = traverse_util.flatten_dict(qwen35_jax.abstract_params(cfg), sep="/")
    total = 0
    for key, box in flat.items():
        name = key.split("/")[-1]
        if name in ("scale", "A_log", "dt_bias", "embed_tokens") or name.startswith("conv"):
            continue
        if key.startswith("mtp"):
            continue
        total += int(np.prod(box.value.shape))
    if cfg.text_config.tie_word_embeddings:
        total += cfg.text_config.vocab_size * cfg.text_config.hidden_size  # the head
    return total


def test_dense_count_matches_six_n_per_token():
    cfg = qwen35_jax.get_config("tiny")
    text = dataclasses.replace(cfg.text_config, full_attention_interval=1, mtp_num_hidden_layers=0)
    cfg = cfg.replace(text_config=text)
    per_token = flops.train_flops_per_token(cfg, seq_len=1)
    n = matmul_params(cfg)
    # at T=1 only the projections remain (attention scores are ~0): exactly 6 N
    assert per_token == pytest.approx(6 * n, rel=2e-3)
    # at T=4096 the causal attention adds 6 * 2 * N_heads * H * T / 2 per layer
    c = cfg.text_config
    extra = 6 * c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim * 4096 / 2
    assert flops.train_flops_per_token(cfg, 4096) == pytest.approx(6 * n + extra, rel=2e-3)


def test_real_preset_is_close_to_six_n_plus_attention():
    cfg = qwen35_jax.get_config("qwen3.5-0.8b").replace(vision_config=None)
    per_token = flops.train_flops_per_token(cfg, 4096, with_mtp=False)
    n = matmul_params(
        cfg.replace(text_config=dataclasses.replace(cfg.text_config, mtp_num_hidden_layers=0))
    )
    assert 1.0 < per_token / (6 * n) < 1.5  # 6N plus attention and the GDN recurrence


def test_moe_counts_only_active_experts():
    base = qwen35_jax.get_config("tiny-moe")
    more = base.replace(text_config=dataclasses.replace(base.text_config, num_experts=64))
    d = base.text_config.hidden_size
    layers = base.text_config.num_hidden_layers + base.text_config.mtp_num_hidden_layers
    diff = flops.train_flops_per_token(more, 128) - flops.train_flops_per_token(base, 128)
    assert diff == pytest.approx(6 * layers * d * (64 - 8))  # only the router grows
    topk = base.replace(text_config=dataclasses.replace(base.text_config, num_experts_per_tok=4))
    diff = flops.train_flops_per_token(topk, 128) - flops.train_flops_per_token(base, 128)
    assert diff == pytest.approx(6 * layers * 2 * 3 * d * base.text_config.moe_intermediate_size)
