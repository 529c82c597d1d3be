"""Blocked (flash-style) attention against the dense form: outputs, gradients, the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax.layers.attention import GatedAttention, attention_mask, dot_product_attention
from qwen35_jax.layers.rotary import rotary_cos_sin
from qwen35_jax.ops.attention import blocked_attention

G, R, H = 2, 2, 16


def _segments(t: int) -> np.ndarray:
    """Two packed rows: documents starting mid-block, padding at the tail (and a pad run)."""
    seg_BT = np.zeros((2, t), np.int32)
    cuts = [0, 37, 100, 171, t - 29]  # row 0: three documents + 29 padding tokens
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        seg_BT[0, a:b] = i + 1
    seg_BT[1, : t // 2 + 5] = 1
    seg_BT[1, t // 2 + 5 : t - 3] = 2  # three padding tokens at the tail
    return seg_BT


def _inputs(t: int):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    q_BTNH = jax.random.normal(k1, (2, t, G * R, H), jnp.float32)
    k_BSGH = jax.random.normal(k2, (2, t, G, H), jnp.float32)
    v_BSGH = jax.random.normal(k3, (2, t, G, H), jnp.float32)
    w_BTNH = jax.random.normal(k4, (2, t, G * R, H), jnp.float32)
    return q_BTNH, k_BSGH, v_BSGH, w_BTNH, jnp.asarray(_segments(t))


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, err


@pytest.mark.parametrize(
    "t,block_q,block_k",
    [(256, 64, 64), (256, 64, 32), (256, 32, 64), (200, 64, 64)],  # 200: T not divisible
)
def test_blocked_matches_dense(t, block_q, block_k):
    q_BTNH, k_BSGH, v_BSGH, w_BTNH, seg_BT = _inputs(t)

    def dense(q_, k_, v_):
        return dot_product_attention(q_, k_, v_, attention_mask(seg_BT))

    def blocked(q_, k_, v_):
        return blocked_attention(q_, k_, v_, seg_BT, block_q=block_q, block_k=block_k)

    for fn_dense, fn_blocked in ((dense, blocked), (jax.jit(dense), jax.jit(blocked))):
        _close(fn_blocked(q_BTNH, k_BSGH, v_BSGH), fn_dense(q_BTNH, k_BSGH, v_BSGH))

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w_BTNH), argnums=(0, 1, 2)))(
            q_BTNH, k_BSGH, v_BSGH
        )

    for got, want in zip(loss(blocked), loss(dense), strict=True):
        _close(got, want)


def test_padding_queries_average_every_value():
    """The dense form's all-masked rows are a uniform average over all T keys; so are ours."""
    q_BTNH, k_BSGH, v_BSGH, _, seg_BT = _inputs(256)
    out_BTNH = blocked_attention(q_BTNH, k_BSGH, v_BSGH, seg_BT, block_q=64, block_k=64)
    mean_BNH = jnp.repeat(v_BSGH.mean(axis=1), R, axis=1)
    pad_b, pad_t = np.nonzero(_segments(256) == 0)
    np.testing.assert_allclose(out_BTNH[pad_b, pad_t], mean_BNH[pad_b], rtol=1e-5, atol=1e-6)


def test_layer_blocked_path_equals_dense_path():
    blocks = dict(attention_block_q=64, attention_block_k=32)  # several blocks at T = 256
    config = q.get_config("tiny").text_config
    t = 256
    seg_BT = jnp.asarray(_segments(t))
    x_BTD = jax.random.normal(jax.random.key(1), (2, t, config.hidden_size), jnp.float32)
    pos_BT = jnp.broadcast_to(jnp.arange(t), (2, t))
    rotary_dim = int(config.head_dim * config.rope_parameters.partial_rotary_factor)
    cos_BTR, sin_BTR = rotary_cos_sin(pos_BT, rotary_dim, config.rope_parameters.rope_theta)
    mask = attention_mask(seg_BT)
    dense = GatedAttention(config, q.Runtime(attention_blocked_min_length=1 << 30, **blocks))
    blocked = GatedAttention(config, q.Runtime(attention_blocked_min_length=64, **blocks))
    params = dense.init(jax.random.key(2), x_BTD, cos_BTR, sin_BTR, mask)
    want = jax.jit(dense.apply)(params, x_BTD, cos_BTR, sin_BTR, mask, seg_BT)
    got = jax.jit(blocked.apply)(params, x_BTD, cos_BTR, sin_BTR, mask, seg_BT)
    _close(got, want)
    # Without segment ids the layer keeps the dense path whatever the length.
    _close(jax.jit(blocked.apply)(params, x_BTD, cos_BTR, sin_BTR, mask), want)


def test_long_rows_take_the_blocked_path_and_match_transformers(tmp_path):
    """At T >= runtime.attention_blocked_min_length (1024) the model's attention layers run the
    blocked kernel; the logits still equal transformers' (max|diff| / max|ref| <= 1e-4)."""
    from tests import hf_oracle

    model = hf_oracle.build(num_hidden_layers=2, full_attention_interval=2)
    config, params = q.load_hf(hf_oracle.save(model, tmp_path))
    t = q.Runtime().attention_blocked_min_length
    ids = np.random.default_rng(0).integers(0, config.text_config.vocab_size, (1, t))
    forward = jax.jit(q.forward, static_argnums=0)
    assert "custom_vjp_call" in str(
        jax.make_jaxpr(q.forward, static_argnums=0)(config, params, ids)
    )
    ours = np.asarray(forward(config, params, ids))
    ref = hf_oracle.logits(model, ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
