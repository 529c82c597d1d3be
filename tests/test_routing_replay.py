"""MoE routing replay (issue 17): recorded experts forced back into the model and into RL.

Model level: replaying the recorded routing with unchanged parameters gives the same logits
(bitwise, MTP included); after perturbing the routers the replayed forward keeps the old
experts (one MoE layer checked against a numpy computation, values and router gradients);
expert-parallel dispatch on 8 devices (fsdp=4, expert=2) replays like one device. RL: a step
with rl.routing_replay records in the pre-update pass and its first update has ratio exactly 1;
a dense model is refused naming the key.
"""

import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qwen35_jax as q
from qwen35_jax import sharding
from qwen35_jax.layers.moe import MoE
from train.rl import replay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0}


def _config(**text):
    c = q.get_config("tiny-moe")  # 8 experts, top-2, one MTP layer
    # one block (GDN + attention) and one tail GDN layer: every scan the routing goes through
    fields = {"num_hidden_layers": 3, "full_attention_interval": 2, **text}
    return c.replace(text_config=c.text_config.__class__(**{**c.text_config.__dict__, **fields}))


def _apply(config, params, ids, routing=None, **kw):
    """q.apply jitted (compile time dominates: XLA's fast path)."""
    fn = jax.jit(lambda p, i, r: q.apply(config, p, i, routing=r, **kw))
    return fn.lower(params, ids, routing).compile(FAST)(params, ids, routing)


@pytest.fixture(scope="module")
def model():
    config = _config()
    params = q.init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, config.text_config.vocab_size)
    return config, params, ids


def _perturb_routers(params, scale=0.5):
    """Every MoE router's weight plus noise (the experts' other weights unchanged)."""

    def f(path, a):
        if jax.tree_util.keystr(path).endswith("['mlp']['gate']"):
            noise = jax.random.normal(jax.random.key(a.size), a.shape, a.dtype)
            return a + scale * noise * jnp.std(a)
        return a

    return jax.tree_util.tree_map_with_path(f, params)


def test_replayed_routing_gives_the_same_logits(model):
    config, params, ids = model
    plain = _apply(config, params, ids, return_mtp=True)
    rec = _apply(config, params, ids, return_mtp=True, return_routing=True)
    assert plain.routing is None
    c = config.text_config
    assert rec.routing.experts.shape == (c.num_hidden_layers, *ids.shape, c.num_experts_per_tok)
    assert rec.routing.mtp_experts.shape == (1, *ids.shape, c.num_experts_per_tok)
    assert rec.routing.experts.dtype == jnp.int32
    np.testing.assert_array_equal(rec.logits, plain.logits)
    # the recorded ids are each layer's top-k of its expert load
    load = np.zeros((c.num_hidden_layers, c.num_experts))
    for layer, e in enumerate(np.asarray(rec.routing.experts)):
        np.add.at(load[layer], e.reshape(-1), 1.0 / ids.size)
    np.testing.assert_allclose(load, rec.expert_load, atol=1e-6)

    again = _apply(config, params, ids, rec.routing, return_mtp=True, return_routing=True)
    np.testing.assert_array_equal(again.logits, plain.logits)
    np.testing.assert_array_equal(again.mtp_logits, plain.mtp_logits)
    np.testing.assert_array_equal(again.aux_loss, plain.aux_loss)
    np.testing.assert_array_equal(again.routing.experts, rec.routing.experts)
    main_only = _apply(config, params, ids, q.Routing(rec.routing.experts), return_mtp=True)
    np.testing.assert_array_equal(main_only.logits, plain.logits)  # the MTP head routes itself
    np.testing.assert_array_equal(main_only.mtp_logits, plain.mtp_logits)


def test_perturbed_routers_replay_the_old_experts(model):
    config, params, ids = model
    rec = _apply(config, params, ids, return_routing=True).routing
    moved = _perturb_routers(params)
    normal = _apply(config, moved, ids, return_routing=True)
    replayed = _apply(config, moved, ids, rec, return_routing=True)
    changed = replay.changed_fraction(normal.routing.experts, rec.experts, jnp.ones(ids.shape))
    assert 0.05 < float(changed) < 0.9  # the perturbation moved some decisions, not all
    assert float(jnp.max(jnp.abs(replayed.logits - normal.logits))) > 1e-3
    # the replayed forward's own top-k (what the routers would pick there) differs from the
    # replayed ids as counted by the metric
    own = replay.changed_fraction(replayed.routing.experts, rec.experts, jnp.ones(ids.shape))
    assert float(own) > 0
    # unperturbed: nothing changed
    same = _apply(config, params, ids, rec, return_routing=True).routing
    assert float(replay.changed_fraction(same.experts, rec.experts, jnp.ones(ids.shape))) == 0


def _numpy_moe(p, x_BTD, experts_BTk):
    """One MoE layer with forced experts, in float64 numpy, every expert computed densely."""
    x = np.asarray(x_BTD, np.float64)
    g = {k: np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(p)}
    get = {jax.tree_util.keystr(k): v for k, v in g.items()}
    logits = x @ get["['gate']"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    e = np.asarray(experts_BTk)
    w = np.take_along_axis(probs, e, axis=-1)
    w /= w.sum(-1, keepdims=True)

    def silu(a):
        return a / (1 + np.exp(-a))

    wg, wu, wd = (get[f"['experts']['{n}_proj']"] for n in ("gate", "up", "down"))
    y_all = np.einsum(
        "btei,eid->bted",
        silu(np.einsum("btd,edi->btei", x, wg)) * np.einsum("btd,edi->btei", x, wu),
        wd,
    )  # [B, T, E, D]
    routed = np.sum(w[..., None] * np.take_along_axis(y_all, e[..., None], axis=2), axis=2)
    sg, su, sd = (get[f"['shared_expert']['{n}_proj']"] for n in ("gate", "up", "down"))
    shared = (silu(x @ sg) * (x @ su)) @ sd
    gate = 1 / (1 + np.exp(-(x @ get["['shared_expert_gate']"])))
    return routed + gate[..., None] * shared


def test_forced_experts_match_numpy_and_train_the_router():
    c = _config().text_config
    layer = MoE(c)
    x = jax.random.normal(jax.random.key(2), (2, 5, c.hidden_size))
    valid = jnp.ones((2, 5), bool)
    p = nn.meta.unbox(layer.init(jax.random.key(3), x, valid)["params"])
    perm = jax.vmap(lambda k: jax.random.permutation(k, c.num_experts))(
        jax.random.split(jax.random.key(4), 10)
    )
    forced = perm[:, : c.num_experts_per_tok].reshape(2, 5, -1).astype(jnp.int32)
    y, stats = layer.apply({"params": p}, x, valid, forced)
    want = _numpy_moe(p, x, forced)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    own = jax.lax.top_k(jax.nn.softmax(x @ p["gate"]), c.num_experts_per_tok)[1]
    assert not np.array_equal(own, forced)  # really forced, not the router's choice
    # counts follow the experts that ran
    np.testing.assert_allclose(
        stats.expert_counts, np.bincount(np.asarray(forced).reshape(-1), minlength=c.num_experts)
    )

    # the router learns through the combine weights: d/d(gate) = numpy's finite difference
    direction = jax.random.normal(jax.random.key(5), p["gate"].shape)
    cot = jax.random.normal(jax.random.key(6), y.shape)

    def loss(gate):
        y, _ = layer.apply({"params": {**p, "gate": gate}}, x, valid, forced)
        return jnp.sum(y * cot)

    g = jax.grad(loss)(p["gate"])
    assert float(jnp.linalg.norm(g)) > 0
    h = 1e-4
    num = [
        np.sum(
            _numpy_moe(
                {**p, "gate": np.asarray(p["gate"], np.float64) + s * h * direction}, x, forced
            )
            * np.asarray(cot, np.float64)
        )
        for s in (1, -1)
    ]
    np.testing.assert_allclose(
        float(jnp.sum(g * direction)), (num[0] - num[1]) / (2 * h), rtol=1e-4
    )


@pytest.mark.slow
def test_expert_parallel_replay_equals_one_device():
    """8 devices (fsdp=4, expert=2), all-to-all dispatch with forced experts = one device
    (there with remat): values and router gradients."""
    config = _config(mtp_num_hidden_layers=0)
    params = q.init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (8, 8), 0, config.text_config.vocab_size)
    rec = _apply(config, params, ids, return_routing=True).routing
    moved = _perturb_routers(params)

    def loss(p, ids, routing):
        out = q.apply(config, p, ids, routing=routing, runtime=runtime)
        return jnp.mean(out.logits**2), out.logits

    runtime = q.Runtime(remat_policy="full")  # the rematerialised scans carry the ids too
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, logits0), g0 = step.lower(moved, ids, rec).compile(FAST)(moved, ids, rec)
    mesh = sharding.make_mesh(fsdp=4, expert=2)
    param_sh = sharding.logical_to_mesh_sharding(q.abstract_params(config), mesh)
    runtime = q.Runtime(moe_dispatch="all_to_all")
    with sharding.use_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        lowered = step.lower(jax.device_put(moved, param_sh), ids, rec)
        assert "all_to_all" in lowered.as_text()
        (l8, logits8), g8 = lowered.compile(FAST)(jax.device_put(moved, param_sh), ids, rec)
    np.testing.assert_allclose(logits8, logits0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l8, l0, rtol=1e-5)
    gate0 = g0["tail_layers"]["mlp"]["gate"]
    gate8 = g8["tail_layers"]["mlp"]["gate"]
    assert float(jnp.linalg.norm(gate0)) > 0
    np.testing.assert_allclose(gate8, gate0, rtol=1e-4, atol=1e-7)


def test_routing_argument_errors(model):
    config, params, ids = model
    layers, k = config.text_config.num_hidden_layers, config.text_config.num_experts_per_tok
    wrong_layers = jnp.zeros((layers - 1, *ids.shape, k), jnp.int32)
    with pytest.raises(ValueError, match=r"routing.experts must be integer expert ids"):
        q.apply(config, params, ids, routing=q.Routing(wrong_layers))
    floats = jnp.zeros((layers, *ids.shape, k))
    with pytest.raises(ValueError, match=r"routing.experts must be integer .* got float32"):
        q.apply(config, params, ids, routing=q.Routing(floats))
    with pytest.raises(ValueError, match="need an MoE model"):
        q.apply(q.get_config("tiny"), None, ids, return_routing=True)


def test_rl_refuses_replay_on_a_dense_model():
    from train.config_schema import ConfigValueError
    from train.rl.config import validate

    c = runpy.run_path(os.path.join(ROOT, "configs", "rl_addition.py"))["get_config"]()
    c.rl.routing_replay = True
    with pytest.raises(ConfigValueError, match=r"rl.routing_replay=True needs an MoE model"):
        validate(c)


@pytest.mark.slow
def test_rl_step_with_routing_replay_has_ratio_one(tmp_path):
    """One update per step on the step's own rollouts: the policy forward replays the experts
    recorded with the same (pre-update) params: no decision changed and the ratio is 1 (to one
    float32 ulp of a log-prob: the record pass and the update are different XLA programs)."""
    from tests.test_rl import tiny_rl_config
    from train.rl import loop

    c = tiny_rl_config(routing_replay=True, recompute_old_logp=True)
    c.train.steps, c.rl.eval_every = 2, 0
    c.rl.num_minibatches = c.rl.num_iterations = 1
    rows = loop.run(c, str(tmp_path / "run"))["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["routing_changed_frac"] == 0.0
        assert abs(r["ratio_mean"] - 1.0) <= 1e-6 and abs(r["ratio_max"] - 1.0) <= 1e-6
        assert r["clip_frac_low"] == 0.0 and r["clip_frac_high"] == 0.0
        assert np.isfinite(r["loss"])
