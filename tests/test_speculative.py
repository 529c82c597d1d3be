"""MTP speculative decoding (`generate(..., num_draft_tokens=k)`): greedy output equals plain
decoding; a perfect MTP head is always accepted; sampling keeps the plain distribution (and a
biased rule is caught); 8 simulated devices equal one."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import qwen35_jax as q
from qwen35_jax import sharding
from qwen35_jax.generate import pad_id, speculative

RT = q.Runtime(gdn_chunk_size=8)
# One batch shape for every greedy run in this file (ragged prompts, one bucket of 16 slots),
# so that the tests share compiled programs (CI runs a file on one worker: --dist loadfile);
# the parameters are traced, so a model's perfect-head variant reuses its programs too.
LENGTHS = (3, 9, 14, 5, 11, 2, 8, 16)
N = 12


@functools.cache
def _model(name: str):
    config = q.get_config(name)
    return config, q.init_params(config, jax.random.key(0), runtime=RT)


def _prompts(config, lengths=LENGTHS):
    vocab = config.text_config.vocab_size
    return [list(np.random.RandomState(i).randint(0, vocab, n)) for i, n in enumerate(lengths)]


@functools.cache
def _stop_id(name: str) -> int:
    """A stop id for `name`'s greedy runs: of the tokens plain decoding emits, the one that
    ends the rows at the most different steps (some rows never emit it)."""
    config, params = _model(name)
    out = q.generate(config, params, _prompts(config), max_new_tokens=N, runtime=RT)
    free = np.asarray(out.tokens)

    def spread(tok):
        hit = free == tok
        ends = np.where(hit.any(1), hit.argmax(1), N)
        return len(set(ends.tolist())) if ends.max() == N else 0

    decoded = np.setdiff1d(free[:, 1:], free[:, 0])  # no row stops at its first token
    return int(max(decoded, key=spread))


def _plain(config, params, stop: int):
    """Plain greedy decoding (k = 0) with stop id `stop`, as (tokens, lengths, logprobs): the
    run without stop ids cut after each row's first stop (what a stop id does; test_generate
    checks it), so that this file compiles one plain program per model."""
    out = q.generate(config, params, _prompts(config), max_new_tokens=N, runtime=RT)
    assert len(out) == 3  # plain output: still a 3-tuple (unpacked by callers)
    tokens, logprobs = np.array(out.tokens), np.array(out.logprobs)
    hit = tokens == stop
    lengths = np.where(hit.any(1), hit.argmax(1) + 1, N)
    after = np.arange(N)[None, :] >= lengths[:, None]
    tokens[after], logprobs[after] = pad_id(config), 0.0
    return tokens, lengths, logprobs


def _speculative(config, params, k: int, stop: int, **kw):
    return q.generate(
        config,
        params,
        _prompts(config),
        max_new_tokens=N,
        stop_token_ids=(stop,),
        runtime=RT,
        num_draft_tokens=k,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_greedy_equals_plain_decoding_for_k_1_2_3(name):
    config, params = _model(name)
    stop = _stop_id(name)  # rows emit it at different times (some never)
    tokens, lengths, logprobs = _plain(config, params, stop)
    assert len(set(lengths.tolist())) > 1 and lengths.max() == N
    for k in (1, 2, 3):
        out = _speculative(config, params, k, stop)
        np.testing.assert_array_equal(out.tokens, tokens, err_msg=f"k={k}")
        np.testing.assert_array_equal(out.lengths, lengths, err_msg=f"k={k}")
        np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4, err_msg=f"k={k}")
        assert np.all(np.asarray(out.num_drafted) > 0)
        assert np.all(np.asarray(out.num_accepted) <= np.asarray(out.num_drafted))
        assert 0.0 <= out.acceptance_rate <= 1.0
    assert len(out) == 5


def perfect_mtp_params(config, params):
    """Every layer's output projections zeroed: the residual stream is the token's embedding, so
    the model's next token is a function of the current one. The MTP head is made the same
    function of the token it is given (fc picks the embedding half; its layer adds nothing;
    its norm is the final norm): it predicts exactly what the model will."""
    d = config.text_config.hidden_size

    def zero_outputs(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith(("out_proj", "o_proj", "down_proj")):
            return jnp.zeros_like(x)
        return x

    params = jax.tree_util.tree_map_with_path(zero_outputs, params)
    mtp = dict(params["mtp"])
    mtp["fc"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0).astype(mtp["fc"].dtype)
    mtp["pre_fc_norm_embedding"] = {"scale": jnp.zeros((d,), jnp.float32)}
    mtp["norm"] = params["norm"]
    return {**params, "mtp": mtp}


def test_a_perfect_mtp_head_is_always_accepted():
    config, params = _model("tiny")
    params = perfect_mtp_params(config, params)
    stop = _stop_id("tiny")  # the greedy test's programs, run on other parameters
    tokens, lengths, _ = _plain(config, params, stop)
    out = _speculative(config, params, 3, stop)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_array_equal(out.lengths, lengths)
    assert out.acceptance_rate == 1.0
    # the first token from the prefill, then 4 per step (3 drafts + 1), the last step cut by
    # max_new_tokens or the stop: 3 drafts per step
    steps = -(-(lengths - 1) // 4)
    assert np.asarray(out.num_drafted).tolist() == (3 * steps).tolist()
    assert steps.max() == 3


def _histogram(tokens: np.ndarray, support: np.ndarray) -> np.ndarray:
    return np.array([(tokens == s).sum() for s in support])


def _two_sample_p(a: np.ndarray, b: np.ndarray) -> float:
    support = np.union1d(np.unique(a), np.unique(b))
    table = np.stack([_histogram(a, support), _histogram(b, support)])
    table = table[:, table.sum(0) >= 5]
    return float(stats.chi2_contingency(table)[1])


def test_sampling_with_drafts_has_the_plain_distribution_and_a_biased_rule_fails(monkeypatch):
    # The perfect head drafts the model's most likely token, which has real mass: a rule that
    # resamples from p after a rejection (instead of p without the draft) over-weights it.
    config, params = _model("tiny")
    params = perfect_mtp_params(config, params)
    rows = 1500
    prompts = [[7, 3, 9]] * rows
    kw = dict(max_new_tokens=3, temperature=1.5, top_k=4, runtime=RT)
    plain = q.generate(config, params, prompts, rng=jax.random.key(1), **kw)
    spec = q.generate(config, params, prompts, rng=jax.random.key(2), num_draft_tokens=2, **kw)
    assert 0.2 < spec.acceptance_rate < 0.9
    plain_t, spec_t = np.asarray(plain.tokens), np.asarray(spec.tokens)
    for i in (1, 2):  # token 0 is sampled alike (prefill); 1 and 2 come from the drafts
        assert _two_sample_p(plain_t[:, i], spec_t[:, i]) > 1e-3, i
    biased = functools.partial(speculative.accept, rule="biased")
    monkeypatch.setattr(speculative, "accept", biased)
    # another Runtime (a setting prompts this short never read) makes `generate` trace again,
    # now with the biased rule, without clearing the compiled programs of the other tests
    kw["runtime"] = dataclasses.replace(RT, attention_block_k=RT.attention_block_k // 2)
    wrong = q.generate(config, params, prompts, rng=jax.random.key(2), num_draft_tokens=2, **kw)
    wrong_t = np.asarray(wrong.tokens)
    assert min(_two_sample_p(plain_t[:, i], wrong_t[:, i]) for i in (1, 2)) < 1e-6


@pytest.mark.slow
def test_eight_devices_equal_one():
    config, params = _model("tiny-moe")
    stop = _stop_id("tiny-moe")  # the unsharded greedy run is the greedy test's program
    sampled_kw = dict(rng=jax.random.key(4), temperature=0.8, top_k=30)
    greedy = _speculative(config, params, 2, stop)
    sampled = _speculative(config, params, 2, stop, **sampled_kw)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    param_sh = sharding.logical_to_mesh_sharding(q.abstract_params(config), mesh)
    sharded = jax.device_put(params, param_sh)
    with sharding.use_mesh(mesh):
        out_g = _speculative(config, sharded, 2, stop)
        out_s = _speculative(config, sharded, 2, stop, **sampled_kw)
    for a, b in ((out_g, greedy), (out_s, sampled)):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.num_accepted, b.num_accepted)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_bad_num_draft_tokens_is_refused():
    config, params = _model("tiny")
    with pytest.raises(ValueError, match="num_draft_tokens=-1"):
        q.generate(config, params, [[1, 2]], max_new_tokens=2, num_draft_tokens=-1)


# ---- the MTP head against an independent numpy implementation of vLLM's qwen3_next_mtp ----


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def _rope(x_TNH, positions, rotary_dim, theta):
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    freqs = positions[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
    rot, rest = x_TNH[..., :rotary_dim], x_TNH[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return np.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def numpy_mtp_logits(w: dict, cfg: dict, h_TD: np.ndarray, next_ids: np.ndarray) -> np.ndarray:
    """vLLM's Qwen3NextMultiTokenPredictor on one sequence, from the checkpoint's tensors:
    pre_fc_norm_embedding(embed(next token)) | pre_fc_norm_hidden(h) -> fc -> one full-attention
    decoder layer (causal) -> norm -> the shared head. Returns [T, V] float64."""
    eps, n, g, hd = (
        cfg[k] for k in ("rms_norm_eps", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    p = "mtp.layers.0."
    e = w["model.embed_tokens.weight"][next_ids]
    x = (
        np.concatenate(
            [
                _rms(e, w["mtp.pre_fc_norm_embedding.weight"], eps),
                _rms(h_TD, w["mtp.pre_fc_norm_hidden.weight"], eps),
            ],
            axis=-1,
        )
        @ w["mtp.fc.weight"].T
    )
    t = x.shape[0]
    y = _rms(x, w[p + "input_layernorm.weight"], eps)
    qg = (y @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:]
    k = (y @ w[p + "self_attn.k_proj.weight"].T).reshape(t, g, hd)
    v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(t, g, hd)
    q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
    k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
    rope = cfg.get("rope_parameters") or {}
    rd = int(hd * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    pos = np.arange(t, dtype=np.float64)
    q, k = _rope(q, pos, rd, theta), _rope(k, pos, rd, theta)
    k, v = np.repeat(k, n // g, axis=1), np.repeat(v, n // g, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr = pr / pr.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", pr, v) * (1.0 / (1.0 + np.exp(-gate)))
    x = x + o.reshape(t, n * hd) @ w[p + "self_attn.o_proj.weight"].T
    y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
    gt = y @ w[p + "mlp.gate_proj.weight"].T
    mlp = gt / (1.0 + np.exp(-gt)) * (y @ w[p + "mlp.up_proj.weight"].T)
    x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    out = _rms(x, w["mtp.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return out @ head.T


def checkpoint_with_mtp(path):
    """A perturbed tiny HF model (transformers has no MTP) plus random `mtp.*` tensors in a
    second shard, declared in the config: what a released checkpoint looks like."""
    import json
    import os

    import torch
    from safetensors.numpy import load_file, save_file

    from qwen35_jax.convert.hf_names import hf_rules
    from qwen35_jax.hf_config import from_hf
    from tests import hf_oracle

    model = hf_oracle.build(moe=False, seed=3, num_hidden_layers=4)
    hf_oracle.save(model, path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    mtp = {}
    for r in hf_rules(from_hf(cfg), multimodal_prefix=False):
        if r.key.startswith("mtp."):
            scale = 0.1 if r.key.endswith("norm.weight") else 1.0 / np.sqrt(r.shape[-1])
            mtp[r.key] = (scale * rng.standard_normal(r.shape)).astype(np.float32)
    save_file(mtp, os.path.join(path, "mtp.safetensors"))
    main = load_file(os.path.join(path, "model.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in main}}
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with torch.no_grad():
        return model, cfg, {**main, **mtp}


def test_mtp_drafting_path_matches_numpy_vllm_qwen3_next_mtp(tmp_path):
    import torch

    from qwen35_jax import decode

    model, cfg, tensors = checkpoint_with_mtp(str(tmp_path))
    config, params = q.load_hf(str(tmp_path))
    assert config.text_config.mtp_num_hidden_layers == 1
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    ids = np.random.RandomState(0).randint(0, cfg["vocab_size"], 12)
    with torch.no_grad():  # the oracle's hidden states: transformers' final-normed output
        h_hf = model.model(torch.tensor(ids[None])).last_hidden_state[0].numpy()
    t = len(ids) - 1  # pairs (h_p, ids[p+1]) for p < t
    want = numpy_mtp_logits(w, cfg, h_hf[:t].astype(np.float64), ids[1 : t + 1])

    rt = q.Runtime()
    slots = 16
    ids_BT = jnp.asarray(ids[None, :t])
    lengths = jnp.asarray([t - 1])  # prefill t - 1 tokens, then one drafting step from the cache
    _, _, h_BTD = decode.prefill(config, params, ids_BT, lengths, slots, return_hidden=True)
    np.testing.assert_allclose(h_BTD[0, : t - 1], h_hf[: t - 1], rtol=1e-4, atol=1e-5)
    ctx, _ = decode.prefill_context(config, lengths, t)
    next_BT = jnp.asarray(ids[None, 1 : t + 1])
    _, pre_BTV, new = speculative._mtp(rt, config, params, h_BTD, next_BT, ctx, None, True)
    np.testing.assert_allclose(pre_BTV[0, : t - 1], want[: t - 1], rtol=1e-4, atol=1e-4)
    # the cached step (prefill of t - 1 pairs, then pair t - 1 against the MTP cache)
    caches = tuple(decode.pad_slots(kv, slots) for kv in new)
    _, last_BD_state, h_full = decode.prefill(
        config, params, jnp.asarray(ids[None, :t]), jnp.asarray([t]), slots, return_hidden=True
    )
    del last_BD_state
    mctx, _ = decode.decode_context(config, lengths, jnp.zeros((1,), jnp.int32), 1, slots)
    _, step_B1V, _ = speculative._mtp(
        rt, config, params, h_full[:, t - 1 : t], next_BT[:, t - 1 : t], mctx, caches, False
    )
    np.testing.assert_allclose(step_B1V[0, 0], want[t - 1], rtol=1e-4, atol=1e-4)
