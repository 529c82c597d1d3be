"""Multimodal training: packing under a fixed patch budget, the jitted step with visual inputs
(its loss = text-only masked CE from `qwen35_jax.apply`), and the digits demo through
`train.loop.run` (loss falls, held-out eval runs; needs the `digits` extra, scikit-learn)."""

from __future__ import annotations

import dataclasses
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qwen35_jax
from qwen35_jax import sharding
from train import config_schema, losses
from train.data.iterator import DataIterator
from train.data.multimodal import (
    MULTIMODAL_FIELDS,
    EncodeExample,
    VisualSpec,
    build_multimodal_dataset,
)
from train.data.tokenizers import WordTokenizer
from train.optimizer import make_optimizer
from train.sampling import greedy_complete
from train.state import TrainState
from train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, P_ROW, G_ROW = 48, 64, 4
TOK = WordTokenizer(("a", "b", "c", "d", "cat", "dog"))


def model_config() -> qwen35_jax.Qwen35Config:
    """tiny-vl, 2 text layers, 8-px patches, special ids at the top of a 32-id vocabulary."""
    cfg = qwen35_jax.get_config("tiny-vl")
    text = dataclasses.replace(
        cfg.text_config,
        vocab_size=32,
        num_hidden_layers=2,
        full_attention_interval=2,
        mtp_num_hidden_layers=0,
    )
    vis = dataclasses.replace(cfg.vision_config, patch_size=8, num_position_embeddings=16)
    return cfg.replace(
        text_config=text,
        vision_config=vis,
        vision_start_token_id=28,
        vision_end_token_id=29,
        image_token_id=30,
        video_token_id=31,
    )


RUNTIME = qwen35_jax.Runtime(gdn_chunk_size=16)


def image(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def documents(n=24, seed=0):
    """Caption pairs, interleaved documents (text first), text-only ones, and one too big."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            docs.append({"parts": [image(rng, 32, 32), "a cat"]})
        elif kind == 1:
            docs.append({"parts": ["b", image(rng, 16, 32), "c dog", image(rng, 32, 16), "d"]})
        elif kind == 2:
            docs.append({"parts": ["a b c d " * (1 + i % 3)]})
        else:
            docs.append({"parts": [image(rng, 48, 32), "dog"]})
    docs.append({"parts": ["a"] * 2 + ["cat " * 60]})  # more than SEQ tokens: skipped
    return docs


def make_iterator(docs, *, rows=4, seed=0):
    encode = EncodeExample(
        TOK, VisualSpec.of(model_config()), seq_len=SEQ, patches_per_row=P_ROW, images_per_row=G_ROW
    )
    ds = build_multimodal_dataset(
        docs,
        encode,
        seq_len=SEQ,
        patches_per_row=P_ROW,
        images_per_row=G_ROW,
        rows_per_shard=rows,
        seed=seed,
    )
    return DataIterator(ds, encode, MULTIMODAL_FIELDS)


def test_packing_with_a_patch_budget():
    cfg = model_config()
    spec = VisualSpec.of(cfg)
    it = make_iterator(documents())
    specials = np.asarray(spec.special_ids)
    for _ in range(6):
        b = next(it)
        assert b["tokens"].shape == b["segment_ids"].shape == b["loss_mask"].shape == (4, SEQ)
        assert b["pixel_values"].shape == (4, P_ROW, spec.patch_dim)
        assert b["pixel_values"].dtype == np.float32
        assert b["image_grid_thw"].shape == (4, G_ROW, 3)
        for r in range(4):
            tok, seg, mask = b["tokens"][r], b["segment_ids"][r], b["loss_mask"][r]
            grids = b["image_grid_thw"][r]
            real = grids[grids[:, 0] > 0]
            assert (grids[len(real) :] == 0).all()  # zero rows pad the grid budget
            # placeholders = merged tokens of the row's grids; real patches = the grids' patches
            assert (tok == cfg.image_token_id).sum() == real.prod(axis=1).sum() // 4
            n_patches = int(real.prod(axis=1).sum())
            assert (b["pixel_values"][r, n_patches:] == 0).all()
            assert (np.abs(b["pixel_values"][r, :n_patches]).sum(axis=1) > 0).all()
            # segments: 1, 2, ... then padding 0; loss mask: text tokens only
            used = seg[seg > 0]
            assert (np.diff(used) >= 0).all() and (seg[len(used) :] == 0).all()
            assert (mask[seg == 0] == 0).all()
            is_special = np.isin(tok, specials)
            assert (mask[(seg > 0) & is_special] == 0).all()
            assert (mask[(seg > 0) & ~is_special] == 1).all()
            # every document ends with eos; images are wrapped by vision_start / vision_end
            for s in np.unique(used):
                doc = tok[seg == s]
                assert doc[-1] == TOK.eos_id
                starts = (doc == cfg.vision_start_token_id).sum()
                assert starts == (doc == cfg.vision_end_token_id).sum()
    assert it.skipped >= 1  # the over-long document


def test_packing_is_deterministic_and_resumes_exactly():
    a, b = make_iterator(documents()), make_iterator(documents())
    next(a), next(b)
    state = a.get_state()
    want = [next(a) for _ in range(3)]
    assert all(
        (x["tokens"] == y["tokens"]).all()
        for x, y in zip(want, [next(b) for _ in range(3)], strict=True)
    )
    c = make_iterator(documents())
    c.set_state(state)
    for w in want:
        got = next(c)
        for k in MULTIMODAL_FIELDS:
            np.testing.assert_array_equal(got[k], w[k])


@pytest.fixture(scope="module")
def model():
    """Parameters drawn from N(0, 0.05^2) in numpy: any values serve to compare two computations
    of one loss, and this skips compiling the initialiser."""
    cfg = model_config()
    rng = np.random.default_rng(0)
    shapes = nn.meta.unbox(qwen35_jax.abstract_params(cfg))
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0.0, 0.05, a.shape).astype(a.dtype)), shapes
    )
    logits_fn = jax.jit(
        lambda p, ids, seg, px, grid: (
            qwen35_jax.apply(
                cfg, p, ids, segment_ids=seg, pixel_values=px, image_grid_thw=grid, runtime=RUNTIME
            ).logits
        )
    )
    return cfg, params, logits_fn


def direct_loss(model, batch):
    """Text-only masked CE from qwen35_jax.apply, written out independently of train/losses."""
    cfg, params, logits_fn = model
    logits = logits_fn(
        params,
        batch["tokens"],
        batch["segment_ids"],
        batch["pixel_values"],
        batch["image_grid_thw"],
    )
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    tok, seg = batch["tokens"], batch["segment_ids"]
    special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    total, count = 0.0, 0
    for r in range(tok.shape[0]):
        for t in range(tok.shape[1] - 1):
            same = seg[r, t] != 0 and seg[r, t + 1] == seg[r, t]
            if same and int(tok[r, t + 1]) not in special:
                total -= logp[r, t, tok[r, t + 1]]
                count += 1
    return total / count


def test_jitted_step_loss_is_the_text_only_ce_of_apply(model):
    """With 2 micro-batches: splitting the rows keeps each row's pixels and grids with it."""
    cfg, params, _ = model
    config = config_schema.base_config("tiny-vl", keep_vision=True)
    config.train.grad_accum = 2
    config.optimizer.warmup_steps = 0
    tx, schedule = make_optimizer(config.optimizer, 10)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=jax.jit(tx.init)(params), skipped=zero)
    batch = next(make_iterator(documents(seed=1)))
    step = jax.jit(make_train_step(cfg, tx, schedule, config.train, runtime=RUNTIME))
    with jax.set_mesh(mesh), sharding.axis_rules():
        new_state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    want = direct_loss(model, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    assert (
        int(metrics["tokens"])
        == (
            batch["loss_mask"][:, 1:]
            * (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
        ).sum()
    )
    assert bool(metrics["finite"])
    # the vision tower is trained too
    new, old = jax.device_get((new_state.params["visual"], params["visual"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new, old)
    assert min(jax.tree.leaves(moved)) > 0


def test_greedy_completion_with_images_matches_apply(model):
    cfg, params, logits_fn = model
    from train.caption_eval import caption_prompts  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images = np.stack([image(rng, 32, 32) for _ in range(3)])
    prompts, pixels, grids = caption_prompts(images, TOK, VisualSpec.of(cfg), max_patches=P_ROW)
    assert pixels.shape == (3, 16, VisualSpec.of(cfg).patch_dim) and grids.shape == (3, 1, 3)
    got = greedy_complete(
        cfg, params, prompts, 1, pixel_values=pixels, image_grid_thw=grids, runtime=RUNTIME
    )
    ids = jnp.asarray(prompts)
    logits = logits_fn(params, ids, jnp.ones_like(ids), pixels, grids)
    assert [g[0] for g in got] == np.argmax(np.asarray(logits[:, -1]), axis=-1).tolist()


def test_loss_mask_removes_targets_for_both_heads():
    tok = jnp.asarray([[5, 30, 30, 29, 6, 7, 1, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]])
    mask = jnp.asarray([[1, 0, 0, 0, 1, 1, 1, 0]])
    _, v1 = losses.shifted_targets(tok, seg, 1, mask)
    _, v2 = losses.shifted_targets(tok, seg, 2, mask)
    assert v1.astype(int).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0]]
    assert v2.astype(int).tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    n1, n2 = losses.target_counts(seg, True, mask)
    assert (float(n1), float(n2)) == (3.0, 3.0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.patches_per_row", 0, "data.patches_per_row=0 must be > 0"),
        ("model.image_token_id", 40, "model.image_token_id=40 must be below"),
    ],
)
def test_multimodal_config_checks_name_the_key(key, value, message):
    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_schema.ConfigValueError, match=message):
        config_schema.validate(config)
    text_only = config_schema.base_config("tiny-vl")
    text_only.data.kind = "digits"
    text_only.data.patches_per_row = text_only.data.images_per_row = 4
    with pytest.raises(config_schema.ConfigValueError, match="model.vision_config"):
        config_schema.validate(text_only)


@pytest.mark.slow  # 60 steps: ~85 s of CPU
def test_digits_config_trains_and_evaluates(tmp_path):
    """A short digits run names held-out digits well above chance (10%): 68/100 after 60 steps;
    its held-out evaluation (every 30 steps) gets most captions exactly right.
    The images must reach the captions for this: the same run trained on shuffled labels (the
    images disconnected from their captions) gets 9/100."""
    pytest.importorskip("sklearn")
    from train import loop  # noqa: PLC0415

    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    config.train.steps = 60
    config.train.log_every = 20
    config.optimizer.warmup_steps = 4
    config.checkpoint.every_steps = 100
    config.data.eval_examples = 100
    config.train.eval_every = 30  # held-out evaluation: eval_loss and exact captions
    config_schema.validate(config)
    summary = loop.run(config, str(tmp_path))
    losses = [r["loss"] for r in summary["rows"]]
    assert losses[-1] < 0.3 * losses[0], losses
    result = summary["eval"]
    assert result["total"] == 100 and len(result["predictions"]) == 100
    assert result["correct"] >= 40, result["predictions"]
    evals = [r for r in summary["rows"] if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] >= 0.3 and evals[-1]["eval_documents"] >= 100, evals
