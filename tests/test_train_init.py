"""init.from_hf: the model config, weights and tokenizer come from a Hugging Face checkpoint."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import qwen35_jax
from tests import hf_oracle
from train import config_schema, init, loop
from train.data.input import input_pipeline
from train.prepare import prepare_data
from train.state import check_params_match


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("hf")
    hf_oracle.save(hf_oracle.build(moe=True, full_attention_interval=3), path)
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return str(path)


def test_from_hf_too_large_for_host_memory_is_refused_before_reading(hf_dir, monkeypatch):
    config = config_schema.base_config("tiny")
    config.init.from_hf = hf_dir
    assert init.available_host_bytes() > 0  # this (Linux) host reports it
    monkeypatch.setattr(init, "available_host_bytes", lambda: 64 * 1024)  # 64 KiB free
    monkeypatch.setattr(
        init.qwen35_jax, "load_hf", lambda *a, **k: pytest.fail("weights read anyway")
    )
    with pytest.raises(config_schema.ConfigValueError, match=r"init\.from_hf=.*hf-to-orbax"):
        init.model_config(config)


def test_from_hf_keeps_every_runtime_setting(hf_dir):
    """The checkpoint replaces the architecture only: expert-parallel choices survive."""
    config = config_schema.base_config("tiny")
    config.runtime.update(
        moe_dispatch="all_to_all", moe_capacity_factor=1.25, remat_policy="full", gdn_chunk_size=16
    )
    config.init.from_hf = hf_dir
    config_schema.validate(config)
    model_cfg, runtime = init.model_config(config), config_schema.runtime_config(config)
    assert model_cfg.text_config.num_experts == 6  # the checkpoint's architecture
    assert runtime == qwen35_jax.Runtime(
        moe_dispatch="all_to_all", moe_capacity_factor=1.25, remat_policy="full", gdn_chunk_size=16
    )


def test_from_hf_takes_config_weights_and_tokenizer(hf_dir, tmp_path):
    config = config_schema.base_config("tiny")
    config.runtime.remat_policy = "full"
    config.runtime.gdn_chunk_size = 16
    config.init.from_hf = hf_dir
    config.data.max_bytes = 50_000
    config_schema.validate(config)
    model_cfg = init.model_config(config)
    runtime = config_schema.runtime_config(config)
    t = model_cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_experts, t.full_attention_interval) == (
        32,
        6,
        6,
        3,
    )
    assert (runtime.remat_policy, runtime.gdn_chunk_size) == ("full", 16)  # ours kept
    abstract = jax.tree.map(
        lambda b: b.value,
        qwen35_jax.abstract_params(model_cfg),
        is_leaf=lambda x: hasattr(x, "value"),
    )
    params = init.initial_params(config, model_cfg, abstract)  # checks the tree itself
    check_params_match(params, abstract, "from_hf")
    bad = dict(params)
    bad["embed_tokens"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="embed_tokens"):
        check_params_match(bad, abstract, "from_hf")

    prepared = prepare_data(config, str(tmp_path))
    assert prepared.tokenizer.path.startswith(hf_dir) and prepared.tokenizer.eos_id == 0
    assert not (tmp_path / "tokenizer").exists()  # no sentencepiece model was trained


def _hf_loss_on_batch(hf_dir: str, batch: dict[str, np.ndarray]) -> float:
    """transformers' mean next-token CE over a packed batch: each document piece on its own."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for tokens, segs in zip(batch["tokens"], batch["segment_ids"], strict=True):
        for seg in np.unique(segs[segs > 0]):
            piece = tokens[segs == seg]
            if len(piece) < 2:
                continue
            with torch.no_grad():
                logits = model(torch.tensor(piece[None].astype(np.int64))).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= float(logp[torch.arange(len(piece) - 1), torch.tensor(piece[1:])].sum())
            count += len(piece) - 1
    return total / count


@pytest.mark.slow
def test_continued_training_starts_at_the_reference_loss(hf_dir, tmp_path):
    """init.from_hf and init.from_checkpoint (a converted orbax checkpoint): the step-0 loss is
    transformers' loss on the same batch (1e-4 relative), and a few steps lower it."""
    from qwen35_jax import sharding
    from qwen35_jax.convert.orbax_io import hf_to_orbax

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.jsonl"
    lines = [" ".join(f"w{i % 40}" for i in range(s, s + n)) for s, n in
             zip(rng.integers(0, 40, 64), rng.integers(5, 40, 64), strict=True)]  # fmt: skip
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))

    def config(**init):
        c = config_schema.base_config("tiny")
        c.init.update(init)
        c.runtime.compute_dtype = "float32"
        c.data.update(kind="jsonl", path=str(corpus))
        c.train.update(steps=4, batch_size=8, seq_len=24, log_every=1, completion_tokens=0)
        c.optimizer.update(lr=3e-2, warmup_steps=0, weight_decay=0.0)
        c.mesh.update(data=1, fsdp=-1)
        config_schema.validate(c)
        return c

    c = config(from_hf=hf_dir)
    summary = loop.run(c, str(tmp_path / "from_hf"))
    first = summary["rows"][0]
    assert first["step"] == 1 and summary["start_step"] == 0

    (tmp_path / "probe").mkdir()
    prepared = prepare_data(c, str(tmp_path / "probe"))
    mesh = sharding.mesh_from_config(c.mesh)
    batch0 = next(input_pipeline(c, prepared, mesh).iterator)
    assert (batch0["segment_ids"] > 1).any()  # packed: several documents in a row
    reference = _hf_loss_on_batch(hf_dir, batch0)
    assert abs(first["loss"] - reference) <= 1e-4 * reference, (first["loss"], reference)
    losses = [r["loss"] for r in summary["rows"]]
    assert losses[-1] < losses[0] - 0.1, losses

    ckpt = str(tmp_path / "orbax")
    hf_to_orbax(hf_dir, ckpt, dtype="float32")
    c2 = config(from_checkpoint=ckpt)
    c2.data.update(tokenizer="hf", tokenizer_path=hf_dir)
    c2.train.steps = 1
    summary2 = loop.run(c2, str(tmp_path / "from_ckpt"))
    assert abs(summary2["rows"][0]["loss"] - first["loss"]) <= 1e-6 * first["loss"]
