"""Generation on 8 simulated devices equals one device; decode compile time is flat in depth."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax import sharding
from qwen35_jax.generate import generate_arrays, pad_id, prompt_bucket

MESHES = {
    "fsdp=4,tensor=2": dict(fsdp=4, tensor=2),
    "fsdp=2,expert=4": dict(fsdp=2, expert=4),
}


@pytest.fixture(scope="module")
def setup():
    config = q.get_config("tiny-moe")
    rt = q.Runtime(gdn_chunk_size=8)
    params = q.init_params(config, jax.random.key(0), runtime=rt)
    prompts = [
        list(np.random.RandomState(i).randint(0, config.text_config.vocab_size, n))
        for i, n in enumerate([3, 9, 14, 5, 11, 2, 8, 16])
    ]
    kw = dict(max_new_tokens=6, rng=jax.random.key(4), temperature=0.8, top_k=30, runtime=rt)
    greedy = q.generate(config, params, prompts, max_new_tokens=6, runtime=rt)
    sampled = q.generate(config, params, prompts, **kw)
    return config, params, prompts, kw, greedy, sampled


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_generate_equals_single_device(setup, mesh_name):
    config, params, prompts, kw, greedy, sampled = setup
    rt = kw["runtime"]
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    param_sh = sharding.logical_to_mesh_sharding(q.abstract_params(config), mesh)
    sharded = jax.device_put(params, param_sh)
    with sharding.use_mesh(mesh):
        out_g = q.generate(config, sharded, prompts, max_new_tokens=6, runtime=rt)
        out_s = q.generate(config, sharded, prompts, **kw)
        if mesh.shape["expert"] > 1:  # the MoE layers dispatch by all-to-all in decode too
            lowered = _lower_greedy(sharded, np.zeros((8, 16), np.int32), config, 6, runtime=rt)
            assert "all_to_all" in lowered.as_text()
    for ours, ref in ((out_g, greedy), (out_s, sampled)):
        np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(ours.lengths), np.asarray(ref.lengths))
        np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    assert out_g.tokens.sharding.is_fully_replicated  # every process can read every row


def _lower_greedy(params, tokens_BT, config, max_new_tokens: int, **kw):
    """`generate_arrays` lowered for greedy decoding of `tokens_BT` (no images, no stop ids)."""
    return generate_arrays.lower(
        params,
        tokens_BT,
        jnp.ones((tokens_BT.shape[0],), jnp.int32),
        jax.random.key(0),
        None,
        None,
        None,
        None,
        config=config,
        slots=tokens_BT.shape[1] + max_new_tokens,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        stop_token_ids=(),
        stream=None,
        **kw,
    )


def _compile_seconds(layers: int) -> float:
    """Seconds to compile `generate_arrays` (prefill + decode loop) for a tiny model of
    `layers` layers; the in-process caches cleared first (no in-process cache hit)."""
    jax.clear_caches()  # otherwise a repeated compile is an in-process cache hit
    base = q.get_config("tiny")
    text = dataclasses.replace(base.text_config, num_hidden_layers=layers, mtp_num_hidden_layers=0)
    config = base.replace(text_config=text)
    params = jax.eval_shape(lambda: q.init_params(config, jax.random.key(0)))
    t = prompt_bucket(5)
    lowered = _lower_greedy(params, jnp.full((2, t), pad_id(config), jnp.int32), config, 8)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def test_generate_compile_time_does_not_grow_with_depth(no_compilation_cache):
    """Prefill + the decode loop for 48 layers compile in < 2x the time of 8 layers: the best
    of two compilations each, interleaved (8, 48, 8, 48) so both see the same load; the first,
    cold one (process-wide warm-up) only ever raises the 8-layer figure it is the min with.
    The persistent compilation cache is off (conftest's fixture, which fails on a hit)."""
    times = {8: [], 48: []}
    for _ in range(2):
        for layers in times:
            times[layers].append(_compile_seconds(layers))
    t8, t48 = min(times[8]), min(times[48])
    assert t48 < 2 * t8, (times[8], times[48])
