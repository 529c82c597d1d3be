"""Expert-parallel MoE dispatch (all-to-all under shard_map) against the single-device MoE.

One MoE layer's routed experts on 8 simulated devices: dropless equals `moe.grouped_experts`
(values and gradients, float32, 1e-5 relative); a capacity factor drops exactly the rows a
per-device count predicts and keeps the rest exact; `auto` picks the path from the mesh.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax import sharding
from qwen35_jax.layers import moe, moe_dispatch

B, T, D, E, F, K = 8, 4, 16, 8, 8, 2  # F: expert width (I)
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tests


@pytest.fixture(scope="module")
def data():
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (B, T, D))
    router = jax.random.normal(keys[1], (D, E))
    w = (
        jax.random.normal(keys[2], (E, D, F)) * 0.3,
        jax.random.normal(keys[3], (E, D, F)) * 0.3,
        jax.random.normal(keys[4], (E, F, D)) * 0.3,
    )
    _, weights_Nk, experts_Nk = moe.route(x.reshape(-1, D), router, K)
    return x, weights_Nk.reshape(B, T, K), experts_Nk.reshape(B, T, K), w


def _local(x, weights, experts, wg, wu, wd):
    y = moe.grouped_experts(
        x.reshape(-1, D), weights.reshape(-1, K), experts.reshape(-1, K), wg, wu, wd
    )
    return y.reshape(B, T, D)


def _ep(x, weights, experts, wg, wu, wd, valid=None, cf=None, mode="all_to_all"):
    valid = jnp.ones((B, T), bool) if valid is None else valid
    layout = moe_dispatch.resolve_mode(mode, B, T, wg.shape, wd.shape)
    return moe_dispatch.expert_parallel(x, weights, experts, valid, wg, wu, wd, layout, cf)


def _loss(y):
    return jnp.sum(jnp.sin(y))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize(
    "mesh_kw",
    [
        dict(fsdp=1, expert=8),
        dict(fsdp=1, data=2, expert=4),
        dict(fsdp=2, tensor=2, expert=2),
        dict(fsdp=4, tensor=2),
    ],
    ids=["expert=8", "data=2,expert=4", "fsdp=2,tensor=2,expert=2", "fsdp=4,tensor=2"],
)
def test_dropless_equals_local(data, mesh_kw):
    x, weights, experts, w = data
    ref = jax.jit(
        jax.value_and_grad(lambda x, *w: _loss(_local(x, weights, experts, *w)), (0, 1, 2, 3))
    )
    loss0, grads0 = ref(x, *w)
    y0 = _local(x, weights, experts, *w)

    def ep_loss(x, *w):
        y, dropped = _ep(x, weights, experts, *w)
        return _loss(y), (y, dropped)

    with sharding.use_mesh(sharding.make_mesh(**mesh_kw)):
        fn = jax.jit(jax.value_and_grad(ep_loss, (0, 1, 2, 3), has_aux=True), compiler_options=FAST)
        (loss, (y, dropped)), grads = fn(x, *w)
    assert float(dropped) == 0
    assert _rel(y, y0) < 1e-5
    assert abs(float(loss - loss0)) <= 1e-5 * abs(float(loss0))
    for g, g0 in zip(grads, grads0, strict=True):
        assert _rel(g, g0) < 1e-5


def _expected_drops(experts, valid, capacity, p, per_device_rows):
    """Numpy model of the capacity rule: per device, per target, rows beyond `capacity`."""
    e_local = E // p
    target = np.asarray(experts).reshape(-1, per_device_rows, K) // e_local  # [devices, n, k]
    ok = np.repeat(np.asarray(valid).reshape(-1, per_device_rows), K, axis=1)
    keep = np.zeros(ok.shape, bool)
    for dev in range(target.shape[0]):
        rows = target[dev].reshape(-1)
        seen = np.zeros(p, int)
        for r, tgt in enumerate(rows):
            if ok[dev, r]:
                keep[dev, r] = seen[tgt] < capacity
                seen[tgt] += 1
    return keep.reshape(B, T, K), int(np.sum(ok & ~keep))


def test_capacity_drops_exactly_the_counted_rows(data):
    x, weights, experts, w = data
    valid = jnp.ones((B, T), bool).at[1, 2:].set(False)  # padding takes no capacity
    p, cf = 8, 1.0
    capacity = math.ceil(cf * T * K / p)  # one batch row (T tokens) per device
    keep, n_dropped = _expected_drops(experts, valid, capacity, p, T)
    assert n_dropped > 0
    with sharding.use_mesh(sharding.make_mesh(fsdp=1, expert=p)):
        fn = jax.jit(lambda *a: _ep(*a, valid=valid, cf=cf), compiler_options=FAST)
        y, dropped = fn(x, weights, experts, *w)
        y_big, dropped_big = jax.jit(
            lambda *a: _ep(*a, valid=valid, cf=float(p)), compiler_options=FAST
        )(x, weights, experts, *w)
    assert int(dropped) == n_dropped
    kept_weights = jnp.where(jnp.asarray(keep), weights, 0.0)
    y_ref = _local(x, kept_weights, experts, *w)
    assert _rel(y, y_ref) < 1e-5
    # cf = P lets every row through: the dropless result on the valid tokens
    y0 = _local(x, weights, experts, *w)
    assert int(dropped_big) == 0
    assert _rel(jnp.where(valid[..., None], y_big, 0), jnp.where(valid[..., None], y0, 0)) < 1e-5


def _uses_all_to_all(fn, *args) -> bool:
    return "all_to_all" in str(jax.make_jaxpr(fn)(*args))


def test_auto_mode_picks_the_path(data):
    x, weights, experts, w = data
    shapes = (w[0].shape, w[2].shape)
    assert moe_dispatch.resolve_mode("auto", B, T, *shapes) is None  # no mesh
    with sharding.use_mesh(sharding.make_mesh(fsdp=8)):  # expert = 1: replicated experts
        assert moe_dispatch.resolve_mode("auto", B, T, *shapes).ep_size == 1
        assert not _uses_all_to_all(lambda *a: _ep(*a, mode="auto")[0], x, weights, experts, *w)
    with sharding.use_mesh(sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])):
        assert moe_dispatch.resolve_mode("auto", B, T, *shapes) is None  # one device
    with sharding.use_mesh(sharding.make_mesh(fsdp=1, data=2, expert=4)):
        layout = moe_dispatch.resolve_mode("auto", B, T, *shapes)
        assert layout is not None and layout.ep_axes == ("expert",) and layout.ep_size == 4
        assert moe_dispatch.resolve_mode("auto", 1, T, *shapes) is None  # batch 1: indivisible
        assert moe_dispatch.resolve_mode("local", B, T, *shapes) is None
        assert _uses_all_to_all(lambda *a: _ep(*a, mode="auto")[0], x, weights, experts, *w)


def test_mode_errors():
    with pytest.raises(ValueError, match="mode"):
        moe_dispatch.resolve_mode("ragged", B, T, (E, D, F), (E, F, D))
    with pytest.raises(ValueError, match="needs a mesh"):
        moe_dispatch.resolve_mode("all_to_all", B, T, (E, D, F), (E, F, D))
    # bug 5: 6 experts over expert=4 is refused, not silently replicated
    with sharding.use_mesh(sharding.make_mesh(fsdp=2, expert=4)):
        for mode in ("auto", "all_to_all"):
            with pytest.raises(ValueError, match=r"6 experts do not divide .*'expert'.* size 4"):
                moe_dispatch.resolve_mode(mode, B, T, (6, D, F), (6, F, D))


def test_moe_module_reads_the_runtime():
    """The MoE layer itself: its runtime selects the path and the capacity; drops are reported."""
    c = q.get_config("tiny-moe").text_config
    x = jax.random.normal(jax.random.key(1), (B, T, c.hidden_size))
    valid = jnp.ones((B, T), bool)
    params = moe.MoE(c).init(jax.random.key(2), x, valid)

    def run(mode, cf):
        layer = moe.MoE(c, q.Runtime(moe_dispatch=mode, moe_capacity_factor=cf or 0.0))
        fn = jax.jit(lambda p, x: layer.apply(p, x, valid), compiler_options=FAST)
        return fn(params, x), _uses_all_to_all(lambda p, x: layer.apply(p, x, valid), params, x)

    (y0, stats0), _ = run("local", None)
    assert float(stats0.dropped_tokens) == 0
    with sharding.use_mesh(sharding.make_mesh(fsdp=1, expert=8)):
        (y1, stats1), a2a = run("auto", None)
        (_, stats2), _ = run("auto", 0.5)
        (y3, stats3), local = run("local", 0.5)  # the local path ignores the capacity
    assert a2a and not local
    assert _rel(y1, y0) < 1e-5 and float(stats1.dropped_tokens) == 0
    assert float(stats2.dropped_tokens) > 0
    assert _rel(y3, y0) < 1e-5 and float(stats3.dropped_tokens) == 0


def test_model_reports_dropped_rows_and_the_logger_shows_them(tmp_path):
    """ModelOutput.dropped_tokens pools every MoE layer's (and the MTP layer's) dropped rows; the
    metrics line shows them, and the MTP head's aux loss (bug 4)."""
    from train.metrics import MetricsLogger

    cfg = q.get_config("tiny-moe")
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=2, full_attention_interval=2)
    cfg = cfg.replace(text_config=text)
    params = q.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, text.vocab_size)

    def dropped(runtime):
        fn = jax.jit(lambda p, i: q.apply(cfg, p, i, return_mtp=True, runtime=runtime))
        out = fn(params, ids)
        assert out.mtp_expert_load.shape == (1, text.num_experts)
        return float(out.dropped_tokens)

    with sharding.use_mesh(sharding.make_mesh(fsdp=1, expert=8)):
        assert dropped(q.Runtime(moe_dispatch="all_to_all")) == 0
        some = dropped(q.Runtime(moe_dispatch="all_to_all", moe_capacity_factor=0.5))
    assert 0 < some < 3 * B * T * text.num_experts_per_tok  # 3 MoE layers: 2 + MTP

    logger = MetricsLogger(
        str(tmp_path), total_steps=2, tokens_per_step=1, flops_per_step=1.0, peak_flops=None
    )
    metrics = dict(loss=1.0, aux_loss=1.0, lr=0.1, grad_norm=1.0, dropped_tokens=some)
    metrics.update(expert_load=np.full((2, 8), 0.25), mtp_expert_load=np.full((1, 8), 0.25))
    row = logger.log(1, {**metrics, "mtp_aux_loss": 1.5})
    logger.close()
    line = logger.console_line(row)
    assert f"dropped {some:,.0f}" in line and "mtp aux 1.500" in line
    assert row["mtp_expert_load"] == [0.25] * 8
