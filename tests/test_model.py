"""Model behaviour on tiny configs: packing, causality, jit/no-jit, remat, MTP, compile time."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax.model import document_positions


def _tiny(name="tiny", **text):
    c = q.get_config(name)
    if text:
        c = c.replace(text_config=c.text_config.__class__(**{**c.text_config.__dict__, **text}))
    return c


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def model(request):
    config = _tiny(request.param, num_hidden_layers=6)  # one block + two tail layers
    return config, q.init_params(config, jax.random.key(0))


def test_packed_documents_equal_separate_runs(model):
    config, params = model
    rng = np.random.RandomState(0)
    lengths = [37, 70, 13]  # documents start mid-chunk (chunk 64)
    docs = [rng.randint(1, config.text_config.vocab_size, n) for n in lengths]
    t = sum(lengths) + 8  # trailing padding
    ids = np.zeros((1, t), np.int32)
    seg = np.zeros((1, t), np.int32)
    start = 0
    for i, doc in enumerate(docs):
        ids[0, start : start + len(doc)] = doc
        seg[0, start : start + len(doc)] = i + 1
        start += len(doc)
    pos = document_positions(jnp.asarray(seg))
    fwd = jax.jit(q.forward, static_argnums=0)
    packed = np.asarray(fwd(config, params, ids, segment_ids=seg, positions=pos))
    start = 0
    for doc in docs:
        alone = np.asarray(fwd(config, params, doc[None]))
        got = packed[0, start : start + len(doc)]
        assert np.max(np.abs(got - alone[0])) <= 1e-4 * np.max(np.abs(alone)), start
        start += len(doc)


def test_document_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    assert document_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_causal_through_gradients(model):
    """d logits[t] / d embedding of token s is zero for s > t (untied, so the head is apart)."""
    config, _ = model
    config = config.replace(
        text_config=config.text_config.__class__(
            **{**config.text_config.__dict__, "tie_word_embeddings": False}
        )
    )
    params = q.init_params(config, jax.random.key(1))
    ids = np.arange(1, 21, dtype=np.int32)[None]
    t0 = 9

    def out_at_t0(embed_scale):
        p = dict(params)
        p["embed_tokens"] = params["embed_tokens"] * embed_scale
        return q.forward(config, p, ids)[0, t0].sum()

    scale = jnp.ones((config.text_config.vocab_size, 1))
    g = np.asarray(jax.jit(jax.grad(out_at_t0))(scale))[:, 0]
    assert np.all(g[ids[0, t0 + 1 :]] == 0)
    assert np.any(g[ids[0, : t0 + 1]] != 0)


def test_jit_equals_no_jit():
    config = _tiny(num_hidden_layers=4)
    params = q.init_params(config, jax.random.key(0))
    ids = np.random.RandomState(3).randint(0, 512, (1, 8))
    with jax.disable_jit():
        eager = np.asarray(q.forward(config, params, ids))
    jitted = np.asarray(jax.jit(q.forward, static_argnums=0)(config, params, ids))
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())


@pytest.mark.slow
def test_remat_gives_the_same_gradients(model):
    config, params = model
    ids = np.random.RandomState(3).randint(0, 512, (2, 24))

    def loss(p, runtime):
        return jnp.mean(q.forward(config, p, ids, runtime=runtime) ** 2)

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, q.Runtime())
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, q.Runtime(remat_policy="full"))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_apply_outputs(model):
    config, params = model
    ids = np.random.RandomState(4).randint(0, 512, (2, 16))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    out = jax.jit(q.apply, static_argnums=0, static_argnames="return_mtp")(
        config, params, ids, attention_mask=mask, return_mtp=True
    )
    c = config.text_config
    assert out.logits.shape == (2, 16, c.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (2, 16, c.hidden_size)
    assert out.mtp_logits.shape == (2, 16, c.vocab_size)
    assert "mtp" in params and "fc" in params["mtp"]
    if c.is_moe:
        assert out.expert_load.shape == (c.num_hidden_layers, c.num_experts)
        np.testing.assert_allclose(out.expert_load.sum(-1), c.num_experts_per_tok, rtol=1e-5)
        assert float(out.aux_loss) > 0
    else:
        assert out.expert_load is None and float(out.aux_loss) == 0


def test_bfloat16_compute_is_close(model):
    config, params = model
    ids = np.random.RandomState(5).randint(0, 512, (1, 40))
    fwd = jax.jit(q.forward, static_argnums=0, static_argnames="runtime")
    ref = np.asarray(fwd(config, params, ids))
    bf = np.asarray(fwd(config, params, ids, runtime=q.Runtime(compute_dtype="bfloat16")))
    assert np.isfinite(bf).all()
    assert np.max(np.abs(bf - ref)) / np.max(np.abs(ref)) < 0.1


def _compile_seconds(layers: int) -> float:
    # jax caches lowerings and executables in process: without clearing, a repeated compile of
    # the same program is a cache hit (microseconds) and the comparison below measures nothing
    jax.clear_caches()
    config = _tiny(num_hidden_layers=layers, mtp_num_hidden_layers=0)
    params = q.init_params(config, jax.random.key(0))
    ids = jnp.zeros((1, 32), jnp.int32)
    lowered = jax.jit(q.forward, static_argnums=0).lower(config, params, ids)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


@pytest.mark.slow
def test_compile_time_does_not_grow_with_depth(no_compilation_cache):
    _compile_seconds(8)  # warm caches shared by both
    t8 = min(_compile_seconds(8) for _ in range(2))
    t48 = min(_compile_seconds(48) for _ in range(2))
    assert t48 < 2 * t8, (t8, t48)
