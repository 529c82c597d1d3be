"""Analytic model FLOPs of a training step, for MFU.

A multiply-add counts 2 FLOPs; training costs 3x the forward pass (forward + backward, whose
two matmuls per forward matmul cost twice the forward); rematerialisation is not counted (model
FLOPs, not hardware FLOPs). Per token of a sequence of length T, forward:

    matmuls      2 * (weights used per token): every projection, the dense FFN, the router, and
                 for MoE only the k *active* routed experts plus the shared expert and its gate
    attention    causal: query t attends to t+1 keys, T/2 on average, per head
                 2 * 2 * N * H * T / 2          (q.k scores and probs.v)
    Gated        chunkwise delta rule as implemented (chunk C, per value head, K key dim,
    DeltaNet     V value dim): intra-chunk q.k, k.k (C*K each), the triangular solve
                 (C*(K+V)/2), P.W_v, P.W_k (C*V + C*K); state terms W_k.S, Q_eff.S, K^T.U
                 (3*K*V); all x2; plus the depthwise conv, 2 * W * channels
    LM head      2 * D * vocab, once for the main head and once more for the MTP head
    MTP          fc (2D -> D) and its full-attention decoder layer(s)

Norms, activations, softmax and the embedding lookup are left out (a few percent at most).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

import qwen35_jax

# Dense bf16 peak per chip (FLOP/s), by `device_kind` substring; CPU is measured instead.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def _ffn_weights(c: qwen35_jax.TextConfig) -> int:
    """FFN weights used by one token in one layer."""
    d = c.hidden_size
    if not c.is_moe:
        return 3 * d * c.intermediate_size
    routed = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size
    shared = 3 * d * c.shared_expert_intermediate_size + d  # + shared_expert_gate
    return d * c.num_experts + routed + shared  # router + active experts + shared expert


def _attention_layer(c: qwen35_jax.TextConfig, seq_len: int) -> float:
    d, n, g, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    proj = d * n * 2 * h + 2 * d * g * h + n * h * d  # q (+ output gate), k, v, o
    scores = 2 * 2 * n * h * seq_len / 2  # causal: half of the T x T scores and mixing
    return 2 * proj + scores


def _gdn_layer(c: qwen35_jax.TextConfig, chunk: int) -> float:
    d = c.hidden_size
    nk, nv, k, v = (
        c.linear_num_key_heads,
        c.linear_num_value_heads,
        c.linear_key_head_dim,
        c.linear_value_head_dim,
    )
    channels = 2 * nk * k + nv * v
    proj = d * channels + d * nv * v + 2 * d * nv + nv * v * d  # qkv, z, b and a, out
    conv = c.linear_conv_kernel_dim * channels
    per_head = chunk * (3 * k + v) + chunk * (k + v) / 2 + 3 * k * v
    return 2 * (proj + conv + nv * per_head)


def forward_flops_per_token(
    config: qwen35_jax.Qwen35Config, seq_len: int, *, runtime: qwen35_jax.Runtime | None = None
) -> float:
    """Model forward FLOPs per token at sequence length `seq_len` (see the module docstring);
    the GDN chunk length is `runtime.gdn_chunk_size`."""
    c = config.text_config
    chunk = min((runtime or qwen35_jax.Runtime()).gdn_chunk_size, seq_len)
    n_full = sum(t == "full_attention" for t in c.layer_types)
    n_linear = c.num_hidden_layers - n_full
    ffn = 2 * _ffn_weights(c)
    total = n_full * (_attention_layer(c, seq_len) + ffn) + n_linear * (_gdn_layer(c, chunk) + ffn)
    head = 2 * c.hidden_size * c.vocab_size
    total += head
    if c.mtp_num_hidden_layers:
        mtp_layer = _attention_layer(c, seq_len) + ffn
        total += 2 * 2 * c.hidden_size * c.hidden_size + c.mtp_num_hidden_layers * mtp_layer + head
    return float(total)


def train_flops_per_token(
    config: qwen35_jax.Qwen35Config,
    seq_len: int,
    with_mtp: bool = True,
    *,
    runtime: qwen35_jax.Runtime | None = None,
) -> float:
    """3x the forward FLOPs (forward + backward); the MTP head only if it is trained."""
    if not with_mtp:
        text = dataclasses.replace(config.text_config, mtp_num_hidden_layers=0)
        config = config.replace(text_config=text)
    return 3.0 * forward_flops_per_token(config, seq_len, runtime=runtime)


@functools.cache
def measured_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this host (the MFU denominator on CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device: the table by device kind, measured matmul rate on CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_flops()
    for kind, flops in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return flops
    return None
