"""Sequence parallelism of Gated DeltaNet, and its decode cache, on 8 simulated CPU devices.

Sequence axes of 2, 4 and 8 devices: the op (`sequence_parallel_gated_delta_rule`), the layer
(conv halo + recurrence, with the prefill cache) and the tiny model's loss and gradients equal
the single-device ones (float32, relative 1e-5), with document starts inside slices and on slice
boundaries and padding. Each sharded program is checked to contain the collectives, so a silent
fallback to the single-device path fails. Decode: prefill + single-token steps (+ a multi-token
continuation) equal the full-sequence layer. The model at sequence=4 is marked slow (the op and
the layer cover 4 in the quick tier).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qwen35_jax as q
from qwen35_jax import sharding
from qwen35_jax.layers.gated_deltanet import GatedDeltaNet
from qwen35_jax.ops import gated_delta_rule, sequence_parallel_gated_delta_rule
from tests.test_sharding import FAST, loss_fn

SIZES = (2, 4, 8)


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _tree_rel(xs, refs) -> float:
    return max(_rel(a, b) for a, b in zip(jax.tree.leaves(xs), jax.tree.leaves(refs), strict=True))


def _mesh(n: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(fsdp=-1, sequence=n)  # n=2: the fsdp=4, sequence=2 mesh


def _segments(b: int, t: int) -> jnp.ndarray:
    """Documents starting mid-slice and on slice boundaries (t/2, t/4, t/8), and padding."""
    seg = np.ones((b, t), np.int32)
    seg[0, 5 * t // 16 :] = 2  # mid-slice for every n
    seg[0, t // 2 :] = 3  # a slice boundary for every n
    seg[0, t - 3 :] = 0  # padding tail
    seg[1, t // 4 : t // 4 + 3] = 0  # padding inside, then a new document on ...
    seg[1, t // 4 + 3 :] = 2
    seg[1, 7 * t // 8 :] = 3  # ... and a document from the last slice's first token
    return jnp.asarray(seg)


# ------------------------------------------------------------------------------------ op level

B, T, H, K, V, C = 2, 128, 2, 16, 8, 16


@pytest.fixture(scope="module")
def op_case():
    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    args = dict(
        q=unit(rng.normal(size=(B, T, H, K))),
        k=unit(rng.normal(size=(B, T, H, K))),
        v=rng.normal(size=(B, T, H, V)),
        g=rng.uniform(-0.5, 0.0, size=(B, T, H)),
        beta=rng.uniform(0.0, 1.0, size=(B, T, H)),
        initial_state=rng.normal(size=(B, H, K, V)),
    )
    args = {k_: jnp.asarray(x, jnp.float32) for k_, x in args.items()}
    cot = (
        jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32),
    )
    seg = _segments(B, T)

    def loss(rule, a):
        o, s = rule(**a, segment_ids=seg, chunk_size=C, return_final_state=True)
        return jnp.sum(o * cot[0]) + jnp.sum(s * cot[1]), (o, s)

    def step(rule):
        grad = jax.value_and_grad(lambda a: loss(rule, a), has_aux=True)
        return jax.jit(grad, compiler_options=FAST)

    ref = step(gated_delta_rule)(args)
    return args, step, ref


@pytest.mark.parametrize("n", SIZES)
def test_op_equals_single_device(op_case, n):
    args, step, ((_, (o0, s0)), g0) = op_case
    with sharding.use_mesh(_mesh(n)):
        lowered = step(sequence_parallel_gated_delta_rule).lower(args)
    assert "collective_permute" in lowered.as_text()  # prev_segment_ids
    assert "all_gather" in lowered.as_text()  # the slices' affine maps
    (_, (o, s)), g = lowered.compile(FAST)(args)
    assert _rel(o, o0) < 1e-5
    assert _rel(s, s0) < 1e-5
    for name in args:
        assert _rel(g[name], g0[name]) < 1e-5, name


def test_op_without_sequence_axis_is_the_plain_kernel(op_case):
    a = op_case[0]
    qkvgb = [a[name] for name in ("q", "k", "v", "g", "beta")]
    kw = dict(initial_state=a["initial_state"], segment_ids=None, chunk_size=C)
    plain = jax.make_jaxpr(lambda *x: gated_delta_rule(*x, **kw))(*qkvgb)
    got = jax.make_jaxpr(lambda *x: sequence_parallel_gated_delta_rule(*x, **kw))(*qkvgb)
    assert str(got) == str(plain)


def test_op_rejects_indivisible_length(op_case):
    args = {k_: x if k_ == "initial_state" else x[:, :-1] for k_, x in op_case[0].items()}
    with sharding.use_mesh(_mesh(4)), pytest.raises(ValueError, match="do not divide"):
        jax.eval_shape(lambda a: sequence_parallel_gated_delta_rule(**a), args)


# --------------------------------------------------------------------------------- layer level


def _gdn_config() -> q.TextConfig:
    return q.get_config("tiny").text_config


@pytest.fixture(scope="module")
def layer_case():
    cfg = _gdn_config()
    layer = GatedDeltaNet(cfg, q.Runtime(gdn_chunk_size=8))
    b, t = 2, 32
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    seg = _segments(b, t)
    params = jax.jit(layer.init)(jax.random.key(0), x, seg)
    cot = jnp.asarray(rng.normal(size=(b, t, cfg.hidden_size)), jnp.float32)

    def loss(p, x):
        y, cache = layer.apply(p, x, seg, return_cache=True)
        return jnp.sum(y * cot) + jnp.sum(cache.state), (y, cache)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), compiler_options=FAST)
    return layer, params, x, step, step(params, x)


@pytest.mark.parametrize("n", SIZES)
def test_layer_equals_single_device(layer_case, n):
    _, params, x, step, ((_, (y0, cache0)), grads0) = layer_case
    with sharding.use_mesh(_mesh(n)):
        lowered = step.lower(params, x)
    assert "collective_permute" in lowered.as_text()  # the conv halo
    (_, (y, cache)), grads = lowered.compile(FAST)(params, x)
    assert _rel(y, y0) < 1e-5
    assert _tree_rel(cache, cache0) < 1e-5
    assert _tree_rel(grads, grads0) < 1e-5


def test_layer_with_indivisible_length_runs_single_device_and_says_so(layer_case, caplog):
    """Bug 5: T=30 over sequence=4 cannot split; the single-device path runs (generation sees
    any length) and the log says so once; training shapes are refused by the config check."""
    layer, params, x, *_ = layer_case
    seg = _segments(2, 32)[:, :30]
    want = jax.jit(layer.apply)(params, x[:, :30], seg)
    with caplog.at_level("WARNING"), sharding.use_mesh(_mesh(4)):
        got = jax.jit(layer.apply)(params, x[:, :30], seg)
        jax.jit(layer.apply)(params, x[:, :30] * 2, seg)
    assert _rel(got, want) < 1e-5
    said = [r for r in caplog.records if "T=30 tokens do not split" in r.getMessage()]
    assert len(said) == 1 and "sequence=4" in said[0].getMessage()


# --------------------------------------------------------------------------------- model level

MB, MT = 4, 32


@pytest.fixture(scope="module")
def model_case():
    """tiny cut to one GDN and one attention layer, chunk 8 (so slices of 4 tokens at n=8)."""
    cfg = q.get_config("tiny")
    text = dataclasses.replace(
        cfg.text_config, num_hidden_layers=2, full_attention_interval=2, mtp_num_hidden_layers=0
    )
    cfg = cfg.replace(text_config=text)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, text.vocab_size, (MB, MT)), jnp.int32)
    seg = jnp.concatenate([_segments(2, MT), jnp.ones((2, MT), jnp.int32)], axis=0)
    params = q.init_params(cfg, jax.random.key(0))
    step = jax.value_and_grad(lambda p, i, s: loss_fn(cfg, p, i, s))
    loss, grads = jax.jit(step, compiler_options=FAST)(params, ids, seg)
    return cfg, params, ids, seg, step, loss, grads


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow), 8])
def test_model_loss_and_grads_equal_single_device(model_case, n):
    cfg, params, ids, seg, step, loss0, grads0 = model_case
    mesh = _mesh(n)
    param_sh = sharding.logical_to_mesh_sharding(q.abstract_params(cfg), mesh)
    batch_sh = sharding.batch_sharding(mesh, MB)
    params = jax.device_put(params, param_sh)
    with sharding.use_mesh(mesh):
        lowered = jax.jit(
            step,
            in_shardings=(param_sh, batch_sh, batch_sh),
            out_shardings=(NamedSharding(mesh, P()), param_sh),
        ).lower(params, ids, seg)
    assert "collective_permute" in lowered.as_text()
    loss, grads = lowered.compile(FAST)(params, ids, seg)
    assert abs(float(loss - loss0)) <= 1e-5 * abs(float(loss0))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), g0 in zip(flat, jax.tree.leaves(grads0), strict=True):
        err = float(jnp.linalg.norm(g - g0) / jnp.maximum(jnp.linalg.norm(g0), 1e-30))
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


# -------------------------------------------------------------------------------------- decode


def test_prefill_then_decode_equals_full_sequence(layer_case):
    """Row 0: a packed prompt whose last document is one token long (the conv window then
    reaches into the earlier document and must be masked); row 1: one document."""
    layer, params, *_ = layer_case
    cfg = _gdn_config()
    b, t, prompt = 2, 14, 6
    x = jnp.asarray(np.random.default_rng(3).normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, prompt - 1 :] = 2
    seg = jnp.asarray(seg)
    full = jax.jit(layer.apply, compiler_options=FAST)(params, x, seg)

    prefill = jax.jit(
        lambda p, x, s: layer.apply(p, x, s, return_cache=True), compiler_options=FAST
    )
    extend = jax.jit(lambda p, x, cache: layer.apply(p, x, None, cache), compiler_options=FAST)
    y, cache = prefill(params, x[:, :prompt], seg[:, :prompt])
    nv, kd, vd = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    assert cache.state.shape == (b, nv, kd, vd)
    assert cache.state.dtype == jnp.float32
    assert cache.conv_q.shape[1] == cfg.linear_conv_kernel_dim - 1
    ys = [y]
    for i in range(prompt, t - 3):  # single-token steps
        y, cache = extend(params, x[:, i : i + 1], cache)
        ys.append(y)
    y, cache = extend(params, x[:, t - 3 :], cache)  # a 3-token continuation (chunk kernel)
    ys.append(y)
    out = jnp.concatenate(ys, axis=1)
    assert _rel(out, full) < 1e-5
    with pytest.raises(ValueError, match="segment_ids_BT=None"):
        layer.apply(params, x[:, :1], seg[:, :1], cache)
