"""Generation against transformers: prefill + decode = one full forward, greedy `generate` =
`model.generate(do_sample=False)` token for token (log-probs = log-softmax of its scores), an
image prompt on the multimodal model, and the output contract (stops, padding, lengths).

Tiny perturbed HF models (float32) read by our load_hf, with a random MTP head added to the
parameters (present, unused by generation).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen35_jax as q
from qwen35_jax import decode
from qwen35_jax.decode_state import (
    abstract_decode_state,
    decode_state_bytes,
    init_decode_state,
)
from qwen35_jax.generate import prompt_bucket
from tests import hf_oracle
from tests.test_vision import G1, G3, IMG, F, build_vl, image_run, text

FAST = {"xla_backend_optimization_level": 0}
_BUILT: dict[str, tuple] = {}


def with_mtp(config: q.Qwen35Config, params: dict) -> tuple[q.Qwen35Config, dict]:
    """The model with a random MTP head (generation must ignore it)."""
    text_cfg = dataclasses.replace(config.text_config, mtp_num_hidden_layers=1)
    config = config.replace(text_config=text_cfg)
    mtp = q.init_params(config, jax.random.key(7))["mtp"]
    return config, {**params, "mtp": mtp}


def pair(kind: str, tmp_path_factory):
    """(HF model, our config, our params) for "dense", "moe" or "vl"; built once per session."""
    if kind not in _BUILT:
        if kind == "vl":
            model = build_vl(moe=False)
        else:
            # 10 layers: 2 blocks (the per-block attention caches) + 2 tail GDN layers
            model = hf_oracle.build(moe=kind == "moe", num_hidden_layers=10, seed=3)
        config, params = q.load_hf(hf_oracle.save(model, tmp_path_factory.mktemp(kind)))
        _BUILT[kind] = (model, *with_mtp(config, params))
    return _BUILT[kind]


def rel(a, b) -> float:
    return hf_oracle.rel_err(a, b)


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(0, vocab, n)) for n in lengths]


# ----------------------------------------------------------------- prefill + decode = forward


def prefill_and_steps(config, params, rows, steps):
    """Logits of each row's last prompt token and of `steps` single-token decode steps that
    feed the rows' continuations: [B, steps + 1, V]."""
    lengths = np.asarray([len(r) - steps for r in rows], np.int32)
    t = prompt_bucket(int(lengths.max()))
    ids = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = r[: lengths[i]]
    pre = jax.jit(decode.prefill, static_argnums=(0, 4), compiler_options=FAST)
    step = jax.jit(decode.decode_step, static_argnums=0, compiler_options=FAST)
    logits, state = pre(config, params, jnp.asarray(ids), jnp.asarray(lengths), t + steps)
    out = [np.asarray(logits)]
    for k in range(steps):
        tok = np.asarray([[r[n + k]] for r, n in zip(rows, lengths, strict=True)], np.int32)
        logits, state = step(config, params, state, jnp.asarray(tok))
        out.append(np.asarray(logits[:, 0]))
    assert np.all(np.asarray(state.length_B) == lengths + steps)
    return np.stack(out, axis=1), lengths


def full_forward_at(config, params, rows, lengths, steps, t=None):
    """Our full forward over each row's prompt + continuation, at the same positions."""
    t = t or max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    fwd = jax.jit(q.forward, static_argnums=0, compiler_options=FAST)
    logits = np.asarray(fwd(config, params, ids, attention_mask=mask))
    idx = lengths[:, None] - 1 + np.arange(steps + 1)[None, :]
    return np.take_along_axis(logits, idx[..., None], axis=1), ids, mask


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_then_decode_equals_full_forward(kind, tmp_path_factory):
    """Ragged prompts ending inside a GDN chunk (37, 20: chunk 64) and at its end (64).

    Bound: 1e-5 relative, or twice the float32 noise of the full forward itself (each row run
    alone vs in the batch) where that is larger: on the perturbed MoE model the noise alone is
    ~1.3e-5 (routing amplifies rounding), on the dense one ~1e-6.
    """
    model, config, params = pair(kind, tmp_path_factory)
    steps = 5
    rows = prompts_of([37 + steps, 20 + steps, 64 + steps], config.text_config.vocab_size)
    ours, lengths = prefill_and_steps(config, params, rows, steps)
    full, ids, mask = full_forward_at(config, params, rows, lengths, steps)
    if kind == "dense":
        assert rel(ours, full) <= 1e-5
    else:  # each row alone, padded to the batch's width (one compilation serves the three)
        width = ids.shape[1]
        alone = np.concatenate(
            [
                full_forward_at(config, params, [r], lengths[i : i + 1], steps, t=width)[0]
                for i, r in enumerate(rows)
            ]
        )
        noise = rel(alone, full)
        assert rel(ours, full) <= max(1e-5, 2 * noise), f"noise of the full forward: {noise:.2e}"
    hf = hf_oracle.logits(model, ids.astype(np.int64), mask.astype(np.int64))
    idx = lengths[:, None] - 1 + np.arange(steps + 1)[None, :]
    assert rel(ours, np.take_along_axis(hf, idx[..., None], axis=1)) <= 1e-4


def test_prefill_longer_than_blocked_attention_threshold(tmp_path_factory):
    """A 1,030-token prompt (bucket 2,048: blocked attention in prefill) then 3 steps."""
    _, config, params = pair("dense", tmp_path_factory)
    steps = 3
    rows = prompts_of([1030 + steps, 9 + steps], config.text_config.vocab_size, seed=1)
    ours, lengths = prefill_and_steps(config, params, rows, steps)
    full, _, _ = full_forward_at(config, params, rows, lengths, steps)
    assert rel(ours, full) <= 1e-5


# ------------------------------------------------------------------ greedy = transformers


def hf_greedy(model, prompt, n, **kw):
    """transformers' greedy generate of exactly n tokens on one prompt: (tokens, log-softmax
    of its scores at the chosen tokens)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    tokens = out.sequences[0, len(prompt) :].numpy()
    logp = torch.log_softmax(torch.stack(out.scores)[:, 0].double(), dim=-1).numpy()
    return tokens, logp[np.arange(n), tokens]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_equals_transformers(kind, tmp_path_factory):
    model, config, params = pair(kind, tmp_path_factory)
    n = 24
    prompts = prompts_of([5, 17, 11], config.text_config.vocab_size, seed=2)
    out = q.generate(config, params, prompts, max_new_tokens=n)
    assert out.tokens.shape == (3, n) and out.tokens.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.lengths), [n, n, n])
    for i, p in enumerate(prompts):
        tokens, logp = hf_greedy(model, p, n)
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), tokens, err_msg=f"row {i}")
        np.testing.assert_allclose(np.asarray(out.logprobs[i]), logp, atol=1e-4, rtol=0)


def test_image_prompt_equals_transformers(tmp_path_factory):
    """A batch of an image prompt and a text prompt on Qwen3_5ForConditionalGeneration: the
    3-D positions continue after the image (rope_deltas)."""
    model, config, params = pair("vl", tmp_path_factory)
    n = 12
    img_prompt = text(5, 0) + image_run(G1) + text(4, 1)
    img2_prompt = text(2, 2) + image_run(G3) + text(3, 3)
    prompts = [img_prompt, text(9, 4), img2_prompt]
    px1 = np.random.RandomState(1).randn(int(np.prod(G1)), F).astype(np.float32)
    px2 = np.random.RandomState(2).randn(int(np.prod(G3)), F).astype(np.float32)
    out = q.generate(
        config,
        params,
        prompts,
        max_new_tokens=n,
        pixel_values=np.concatenate([px1, px2]),
        image_grid_thw=np.asarray([G1, G3]),
    )
    for i, (p, px, g) in enumerate(
        ((img_prompt, px1, G1), (prompts[1], None, None), (img2_prompt, px2, G3))
    ):
        kw = {}
        if px is not None:
            kw = dict(
                pixel_values=torch.tensor(px),
                image_grid_thw=torch.tensor([g]),
                mm_token_type_ids=(torch.tensor([p]) == IMG).int(),  # HF's 3-D positions need it
            )
        tokens, logp = hf_greedy(model, p, n, **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), tokens, err_msg=f"row {i}")
        np.testing.assert_allclose(np.asarray(out.logprobs[i]), logp, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- output contract


def test_stops_padding_and_lengths(tmp_path_factory):
    """A row stops after emitting a stop id (kept); then pad tokens and logprob 0; the loop
    ends early when every row has stopped."""
    _, config, params = pair("dense", tmp_path_factory)
    prompts = prompts_of([4, 9], config.text_config.vocab_size, seed=5)
    free = q.generate(config, params, prompts, max_new_tokens=10)
    stop = int(free.tokens[0, 3])  # row 0 stops at step 3 (or earlier, if it came before)
    out = q.generate(config, params, prompts, max_new_tokens=10, stop_token_ids=(stop,))
    tokens, lengths, logp = (np.asarray(a) for a in out)
    for i in range(2):
        free_i = np.asarray(free.tokens[i])
        hits = np.nonzero(free_i == stop)[0]
        n = hits[0] + 1 if len(hits) else 10
        assert lengths[i] == n
        np.testing.assert_array_equal(tokens[i, :n], free_i[:n])
        assert np.all(tokens[i, n:] == 0) and np.all(logp[i, n:] == 0.0)
        np.testing.assert_allclose(logp[i, :n], np.asarray(free.logprobs[i, :n]), atol=1e-6)
    assert lengths[0] <= 4


def test_sampling_is_reproducible(tmp_path_factory):
    _, config, params = pair("dense", tmp_path_factory)
    prompts = prompts_of([6, 3], config.text_config.vocab_size, seed=6)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9)
    a = q.generate(config, params, prompts, rng=jax.random.key(1), **kw)
    b = q.generate(config, params, prompts, rng=jax.random.key(1), **kw)
    c = q.generate(config, params, prompts, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    assert np.all(np.asarray(a.logprobs) < 0)


def test_decode_state_shapes_and_bytes(tmp_path_factory):
    _, config, _ = pair("dense", tmp_path_factory)
    c = config.text_config
    state = init_decode_state(config, 3, 40)
    assert state.linear.state.shape == (
        c.num_blocks,
        c.full_attention_interval - 1,
        3,
        c.linear_num_value_heads,
        c.linear_key_head_dim,
        c.linear_value_head_dim,
    )
    assert state.linear.state.dtype == jnp.float32
    assert len(state.full) == c.num_blocks  # one cache per block, read in place
    assert state.full[0].k.shape == (3, c.num_key_value_heads, c.head_dim, 40)  # keys [B,G,H,S]
    assert state.full[0].v.shape == (3, c.num_key_value_heads, 40, c.head_dim)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert decode_state_bytes(config, 3, 40) == nbytes
    gdn = c.num_hidden_layers - c.num_blocks
    conv = (c.linear_conv_kernel_dim - 1) * (
        2 * c.linear_num_key_heads * c.linear_key_head_dim
        + c.linear_num_value_heads * c.linear_value_head_dim
    )
    rec = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    kv = 2 * 40 * c.num_key_value_heads * c.head_dim
    expected = 4 * 3 * (gdn * (conv + rec) + c.num_blocks * kv) + 2 * 4 * 3
    assert decode_state_bytes(config, 3, 40) == expected
    big = q.get_config("qwen3.5-397b-a17b")
    assert jax.tree.leaves(abstract_decode_state(big, 1, 4096))  # shapes only, no memory
    # launch/plan.py counts it per device: rows over the batch axes
    from launch.plan import decode_state_bytes as per_device  # noqa: PLC0415

    one = dict(data=1, fsdp=1, tensor=1, expert=1, sequence=1)
    assert per_device(big, 8, 4352, one) == decode_state_bytes(big, 8, 4352) == 3_702_128_704
    assert per_device(big, 8, 4352, one | dict(fsdp=8)) * 8 == decode_state_bytes(big, 8, 4352)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
        (dict(prompts=[[1, 500]]), r"prompts\[0\] has token ids outside \[0, 96\)"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k=-2 must be >= 0"),
        (dict(max_new_tokens=10**7), "exceeds the model's context"),
    ],
)
def test_bad_arguments_are_named(kw, match, tmp_path_factory):
    _, config, params = pair("dense", tmp_path_factory)
    args = dict(prompts=[[1, 2]], max_new_tokens=2) | kw
    with pytest.raises(ValueError, match=match):
        q.generate(config, params, args.pop("prompts"), **args)
