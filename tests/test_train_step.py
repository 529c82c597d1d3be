"""The jitted train step: an 8-device mesh equals one device, gradient accumulation equals one
big batch, a non-finite step is skipped, and nan_policy="stop" keeps the last checkpoint."""

from __future__ import annotations

import dataclasses
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax
from qwen35_jax import sharding
from train.config_schema import base_config
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state
from train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    cfg = qwen35_jax.get_config("tiny-moe")
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=2, full_attention_interval=2)
    cfg = cfg.replace(text_config=text)
    config = base_config("tiny-moe")
    config.optimizer.warmup_steps = 0
    config.optimizer.lr = 1e-2
    # Adam's first update is lr * g / (|g| + eps): with the default eps a ~1e-9 gradient (an
    # expert that barely saw a token) flips a whole lr-sized step on summation-order noise;
    # a large eps keeps the update a smooth function of the gradient, so steps compare tightly.
    config.optimizer.eps = 1e-3
    tx, schedule = make_optimizer(config.optimizer, 10)
    params = qwen35_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, text.vocab_size, size=(8, 32)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 12 + [2] * 16 + [0] * 4]), 8, axis=0).astype(np.int32)
    pos = np.asarray(qwen35_jax.model.document_positions(jnp.asarray(seg)))
    batch = {"tokens": tok, "segment_ids": seg, "positions": pos}
    return cfg, config, tx, schedule, params, batch


RUNTIME = qwen35_jax.Runtime(gdn_chunk_size=16)
_STEPS = {}  # (mesh axes, grad_accum) -> (jitted step, shardings, mesh): compiled once


def one_step(setup, axes, *, grad_accum=1, params=None, loss_chunk=0):
    cfg, config, tx, schedule, base_params, batch = setup
    key = (tuple(sorted(axes.items())), grad_accum, loss_chunk)
    if key not in _STEPS:
        mesh = sharding.make_mesh(**axes) if axes else sharding.make_mesh(devices=jax.devices()[:1])
        config.train.grad_accum = grad_accum
        config.train.loss_chunk = loss_chunk
        _, shardings = abstract_state(cfg, tx, mesh)
        batch_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
        )
        step = jax.jit(
            make_train_step(cfg, tx, schedule, config.train, runtime=RUNTIME),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        _STEPS[key] = (step, batch_sharding, mesh)
    step, batch_sharding, mesh = _STEPS[key]
    params = base_params if params is None else params
    state = init_state(cfg, tx, mesh, jax.random.key(0), jax.tree.map(jnp.array, params))
    with jax.set_mesh(mesh), sharding.axis_rules():
        state, metrics = step(state, jax.device_put(batch, batch_sharding))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single(setup):
    return one_step(setup, {})


def assert_same_step(
    a,
    b,
    rtol=2e-5,
    atol=1e-6,
    keys=("loss", "mtp_loss", "aux_loss", "objective", "grad_norm"),
    skip_router=False,
):
    (state_a, m_a), (state_b, m_b) = a, b
    for key in keys:
        assert float(m_b[key]) == pytest.approx(float(m_a[key]), rel=rtol), key
    leaves_a = jax.tree_util.tree_leaves_with_path(state_a.params)
    for (path, x), y in zip(leaves_a, jax.tree.leaves(state_b.params), strict=True):
        if skip_router and jax.tree_util.keystr(path).endswith("['mlp']['gate']"):
            continue
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(x), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize(
    "axes", [{"fsdp": 8}, pytest.param({"data": 8, "fsdp": 1}, marks=pytest.mark.slow)]
)
def test_eight_device_mesh_step_equals_single_device(setup, single, axes):
    assert jax.device_count() == 8
    state, metrics = one_step(setup, axes)
    assert_same_step(single, (state, metrics))
    assert int(state.step) == 1 and bool(metrics["finite"])


@pytest.mark.slow
def test_chunked_cross_entropy_step_equals_whole_logits(setup, single):
    """train.loss_chunk=12 on 32-token rows (chunks 12, 12, 8 + 4 padded) on fsdp=4 x sequence=2
    (rows and positions both split; chunks cross the sequence shards): the same
    losses, grad norm and updated parameters as the whole-logits step on one device."""
    assert_same_step(single, one_step(setup, {"fsdp": 4, "sequence": 2}, loss_chunk=12))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch(setup, single):
    # The MoE aux loss is a product of batch means, so accumulation averages the micro-batches'
    # aux losses instead: the router weights (whose gradient it dominates) differ, and through
    # the router's inputs every parameter moves by up to ~1e-5 (first updates are ~1e-3).
    assert_same_step(
        single,
        one_step(setup, {}, grad_accum=2),
        atol=5e-5,
        keys=("loss", "mtp_loss", "objective", "grad_norm"),
        skip_router=True,
    )


def test_non_finite_step_leaves_the_state_unchanged(setup):
    cfg, config, tx, schedule, params, batch = setup
    poisoned = jax.tree.map(jnp.array, params)
    poisoned["norm"]["scale"] = poisoned["norm"]["scale"].at[0].set(jnp.nan)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    before = init_state(cfg, tx, mesh, jax.random.key(0), jax.tree.map(jnp.array, poisoned))
    before = jax.device_get(before)
    state, metrics = one_step(setup, {}, params=poisoned)
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    assert int(state.step) == 1 and int(state.skipped) == 1
    for x, y in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(state.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_nan_policy_stop_keeps_the_last_good_checkpoint(tmp_path):
    from train import loop
    from train.init import params_from_training_checkpoint

    config = runpy.run_path(os.path.join(ROOT, "configs", "tiny_cpu.py"))["get_config"]()
    config.mesh.data, config.mesh.fsdp, config.train.batch_size = -1, 1, 8
    config.train.nan_policy = "stop"
    config.train.steps, config.train.log_every, config.train.completion_tokens = 6, 1, 0
    config.checkpoint.every_steps = 1
    config.optimizer.lr, config.optimizer.warmup_steps, config.optimizer.clip_norm = 1e30, 0, 0.0
    with pytest.raises(loop.NonFiniteLossError, match="NaN/Inf") as err:
        loop.run(config, str(tmp_path / "run"))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit())
    assert steps, "at least the first (finite) step was saved"
    cfg = qwen35_jax.Qwen35Config.from_dict(config.model.to_dict())
    abstract = jax.tree.map(
        lambda b: b.value, qwen35_jax.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "value")
    )
    params = params_from_training_checkpoint(str(tmp_path / "run" / "checkpoints"), abstract)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    assert str(max(steps)) in str(err.value) or "intact" in str(err.value)
