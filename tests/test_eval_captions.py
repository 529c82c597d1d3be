"""Held-out evaluation of image-caption data (train/evaluation.py, train/caption_eval.py):
eval_loss is `qwen35_jax.apply`'s text-only cross-entropy on the held-out batches, and
eval_accuracy (teacher-forced exact captions) equals a numpy count from apply's logits; it is 1
on documents whose captions were rewritten to the model's own greedy tokens and 0 elsewhere,
so it can fail. Digits' held-out images are their own split, never trained on."""

from __future__ import annotations

import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import qwen35_jax
from qwen35_jax import mesh as mesh_lib
from train import config_schema, evaluation
from train.caption_eval import document_matches, head_pass
from train.prepare import prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_document_counts_only_when_every_text_target_is_the_argmax():
    # row 0: document 1 (targets at t=1, 2) all hit; document 2 (t=4, 5) misses t=5
    # row 1: document 1 has no target (an image only); document 2 (t=2) hit; padding after
    seg_BT = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 0, 0]])
    valid_BT = jnp.asarray([[0, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0]], bool)
    hit_BT = jnp.asarray([[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 1, 1]], bool)
    docs, exact = document_matches(hit_BT, valid_BT, seg_BT)
    assert (float(docs), float(exact)) == (3.0, 2.0)
    docs, exact = document_matches(jnp.ones_like(hit_BT), valid_BT, seg_BT)
    assert (float(docs), float(exact)) == (3.0, 3.0)

    # the chunked head pass: the same CE and argmax with or without chunks (T = 6, chunk 4)
    rng = np.random.default_rng(0)
    hidden_BTD = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    head_DV = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    logits_BTV = np.asarray(hidden_BTD) @ np.asarray(head_DV)
    targets_BT = jnp.asarray(np.argmax(logits_BTV, -1) * (rng.random((2, 6)) < 0.5))
    whole = head_pass(hidden_BTD, head_DV, targets_BT, valid_BT, chunk=0, dtype=jnp.float32)
    parts = head_pass(hidden_BTD, head_DV, targets_BT, valid_BT, chunk=4, dtype=jnp.float32)
    np.testing.assert_allclose(whole[0], parts[0], rtol=1e-6)
    assert float(whole[1]) == float(parts[1]) == 5.0
    np.testing.assert_array_equal(whole[2], parts[2])
    np.testing.assert_array_equal(whole[2], np.argmax(logits_BTV, -1) == np.asarray(targets_BT))


def _digits_config(**train):
    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    config.train.eval_every = 10
    config.train.eval_batches = 2
    config.train.update(train)
    config_schema.validate(config)
    return config


def _numpy_sums(logits_BTV, batch):
    """(CE sum, targets, documents, exact documents) from full logits, in numpy float64."""
    tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    logits = np.asarray(logits_BTV, np.float64)[:, :-1]
    targets = tokens[:, 1:]
    valid = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] != 0) & (mask[:, 1:] == 1)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    hit = np.argmax(logits, -1) == targets
    docs = exact = 0
    for b in range(len(tokens)):
        for s in set(seg[b, 1:][valid[b]].tolist()):
            mine = valid[b] & (seg[b, 1:] == s)
            docs += 1
            exact += bool(hit[b][mine].all())
    return float(((lse - picked) * valid).sum()), float(valid.sum()), docs, exact


def test_caption_eval_is_apply_s_text_loss_and_its_exact_captions(tmp_path):
    pytest.importorskip("sklearn")
    config = _digits_config()
    prepared = prepare_data(config, str(tmp_path))
    assert prepared.eval.source.split == "eval"  # data/digits.py's held-out images
    assert prepared.stats["eval_documents"] == len(prepared.eval.source) == 297
    model_cfg = config_schema.model_config(config)
    runtime = config_schema.runtime_config(config)
    batches = evaluation.eval_batches(config, prepared, model_cfg)
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (8, 112, 384)
    again = evaluation.eval_batches(config, prepared, model_cfg)
    for x, y in zip(batches, again, strict=True):  # fixed: the same at every evaluation
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])

    params = qwen35_jax.init_params(model_cfg, jax.random.key(5), runtime=runtime)
    logits_fn = jax.jit(
        lambda p, b: (
            qwen35_jax.apply(
                model_cfg,
                p,
                b["tokens"],
                segment_ids=b["segment_ids"],
                pixel_values=b["pixel_values"],
                image_grid_thw=b["image_grid_thw"],
                runtime=runtime,
            ).logits
        )
    )
    # batch 0's captions become the model's own greedy tokens (3 text tokens per document:
    # "digit", the label, eos; each pass fixes one more), placeholder ids excepted
    b0 = batches[0]
    valid = (b0["segment_ids"][:, :-1] == b0["segment_ids"][:, 1:]) & (b0["loss_mask"][:, 1:] == 1)
    valid &= b0["segment_ids"][:, 1:] != 0
    placeholders = [model_cfg.image_token_id, model_cfg.video_token_id]
    for _ in range(3):
        greedy = np.argmax(np.asarray(logits_fn(params, b0)), -1)[:, :-1]
        usable = valid & ~np.isin(greedy, placeholders)
        b0["tokens"][:, 1:] = np.where(usable, greedy, b0["tokens"][:, 1:])

    mesh = mesh_lib.mesh_from_config(config.mesh)  # 8 devices: one row each
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
    params = jax.device_put(params, replicated)
    result = evaluation.Evaluator(batches, mesh, model_cfg, runtime, replicated)(params)

    sums = np.zeros(4)
    per_batch = []
    for b in batches:
        one = _numpy_sums(logits_fn(params, b), b)
        per_batch.append(one)
        sums += one
    ce, n, docs, exact = sums
    assert result.tokens == int(n) and result.documents == int(docs)
    np.testing.assert_allclose(result.loss, ce / n, rtol=2e-5)
    assert result.accuracy == exact / docs
    assert per_batch[0][3] >= 0.8 * per_batch[0][2]  # rewritten: (nearly) all exact
    assert per_batch[1][3] <= 0.2 * per_batch[1][2]  # an untrained model's own captions: not
    row = result.row()
    assert row["eval_accuracy"] == result.accuracy and row["eval_documents"] == docs


def test_image_text_documents_held_out_by_hash_are_never_trained_on(tmp_path):
    from PIL import Image  # noqa: PLC0415
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    from train.data.input import input_pipeline  # noqa: PLC0415
    from train.data.split import is_held_out  # noqa: PLC0415

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    lines = []
    for i in range(40):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": f"a {words[i]}"}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "a": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))

    config = runpy.run_path(os.path.join(ROOT, "configs", "image_text.py"))["get_config"]()
    config.data.path = str(tmp_path / "docs.jsonl")
    config.data.tokenizer, config.data.tokenizer_path = "hf", str(tmp_path / "tokenizer.json")
    config.data.vocab_size = 48
    config.data.eval_fraction = 0.3
    config.train.update(seq_len=32, batch_size=2, eval_batches=1)
    config.data.update(patches_per_row=16, images_per_row=2)
    config_schema.validate(config)
    prepared = prepare_data(config, str(tmp_path))
    held = {i for i in range(40) if is_held_out(lines[i].encode(), 0.3)}
    assert 0 < len(held) < 40
    assert prepared.stats["eval_documents"] == len(held)
    assert prepared.stats["documents_read"] == 40 - len(held)

    def captions(tokens_BT):  # the word ids of the batch -> document numbers
        ids = np.asarray(tokens_BT).ravel()
        return {int(i) - 3 for i in ids if 3 <= i < 43}

    pipe = input_pipeline(config, prepared, mesh_lib.mesh_from_config(config.mesh))
    trained = set()
    for _ in range(40):
        trained |= captions(pipe.next_global_batch()["tokens"])
    assert trained == set(range(40)) - held
    batches = evaluation.eval_batches(config, prepared)
    assert batches and set().union(*(captions(b["tokens"]) for b in batches)) <= held


def test_digits_evaluate_their_own_held_out_images_only():
    config = _digits_config()  # train.eval_every alone: valid
    config.data.eval_fraction = 0.1
    with pytest.raises(config_schema.ConfigValueError, match="data.eval_fraction=0.1 is not for"):
        config_schema.validate(config)
