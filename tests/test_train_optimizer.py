"""Optimizer: weight-decay mask, schedules, clipping and decoupled decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import qwen35_jax
from train.config_schema import base_config
from train.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def flat_mask(name):
    boxed = qwen35_jax.abstract_params(qwen35_jax.get_config(name))
    params = jax.tree.map(lambda b: b.value, boxed, is_leaf=lambda x: hasattr(x, "value"))
    return traverse_util.flatten_dict(decay_mask(params), sep="/")


def test_decay_mask_excludes_norms_biases_and_gates():
    mask = flat_mask("tiny-moe")
    off = {k for k, v in mask.items() if not v}
    on = {k for k, v in mask.items() if v}
    for key in off:
        leaf = key.split("/")[-2:]
        assert leaf[-1] in ("scale", "A_log", "dt_bias", "gate", "shared_expert_gate") or leaf[
            -1
        ].endswith("bias"), key
    gdn, full = "blocks/linear_layers/linear_attn/", "blocks/full_layer/"
    for name in (
        gdn + "A_log",
        gdn + "dt_bias",
        gdn + "norm/scale",
        full + "mlp/gate",
        full + "mlp/shared_expert_gate",
        full + "self_attn/q_norm/scale",
        "norm/scale",
        "mtp/pre_fc_norm_hidden/scale",
        "mtp/norm/scale",
    ):
        assert name in off, name
    for name in (
        "embed_tokens",
        "lm_head",
        full + "self_attn/q_proj",
        gdn + "in_proj_a",
        gdn + "conv_q",
        full + "mlp/experts/gate_proj",
        full + "mlp/shared_expert/gate_proj",
        "mtp/fc",
    ):
        assert name in on, name


def test_decoupled_weight_decay_follows_the_mask():
    opt = base_config().optimizer
    opt.lr, opt.warmup_steps, opt.weight_decay, opt.clip_norm = 0.1, 0, 0.5, 0.0
    tx, _ = make_optimizer(opt, 10)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}, "A_log": jnp.ones((2,))}
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5)  # lr * wd * p, no gradient
    np.testing.assert_allclose(new["norm"]["scale"], 1.0)
    np.testing.assert_allclose(new["A_log"], 1.0)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedules(schedule):
    opt = base_config().optimizer
    opt.lr, opt.warmup_steps, opt.schedule = 1.0, 10, schedule
    opt.min_lr_ratio, opt.decay_fraction = 0.1, 0.2
    sched = learning_rate_schedule(opt, 100)
    lr = np.asarray([float(sched(i)) for i in range(101)])
    assert lr[0] == pytest.approx(0.1) and lr[10] == pytest.approx(1.0)
    assert np.all(np.diff(lr[:11]) > 0)
    assert lr[100] == pytest.approx(0.1, abs=1e-6)
    if schedule == "wsd":
        np.testing.assert_allclose(lr[10:80], 1.0)  # stable until the last 20% of steps
        assert np.all(np.diff(lr[80:]) < 0)
    else:
        assert np.all(np.diff(lr[10:]) <= 1e-7)


def test_clipping_bounds_the_update():
    opt = base_config().optimizer
    opt.lr, opt.warmup_steps, opt.weight_decay, opt.clip_norm = 1.0, 0, 0.0, 1.0
    opt.b1 = opt.b2 = 0.0
    tx, _ = make_optimizer(opt, 10)
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.full((4,), 100.0)}
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
