"""data.kind="image_jsonl": JSON-lines image-text documents (image files on disk) through the
multimodal pipeline and `train.loop.run`; unreadable lines and images are skipped and counted."""

from __future__ import annotations

import json
import os
import runpy

import numpy as np
import pytest

from train import config_schema
from train.data.image_text import ImageFile, ImageTextJsonl, document_text
from train.data.sources import open_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 caption pairs, 1 interleaved document, and 3 bad lines (JSON, missing, corrupt image)."""
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("image_text")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        name = list(COLOURS)[i % 3]
        pixels = np.clip(rng.normal(COLOURS[name], 20, (24 + 4 * (i % 3), 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "text": f"a {name} square"}))
    parts = ["first", {"image": "img/0.png"}, "then", {"image": "img/1.png"}, "and more"]
    lines.append(json.dumps({"parts": parts}))
    lines.append("{not json")
    lines.append(json.dumps({"image": "img/missing.png", "text": "a red square"}))
    (root / "img" / "corrupt.png").write_bytes(b"not a png at all")
    lines.append(json.dumps({"image": "img/corrupt.png", "text": "a blue square"}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n\n")
    words = ["a", "square", *COLOURS, "first", "then", "and", "more"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    return root


def test_source_parses_pairs_interleaved_documents_and_bad_lines(corpus):
    src = ImageTextJsonl(open_source("jsonl", str(corpus / "docs.jsonl")))
    assert len(src) == 16  # blank lines are not records
    pair = src[3]["parts"]
    assert pair == [ImageFile(str(corpus / "img" / "3.png")), "a red square"]
    assert pair[0].load().shape == (24, 32, 3) and pair[0].load().dtype == np.uint8
    doc = src[12]["parts"]
    assert [type(p).__name__ for p in doc] == ["str", "ImageFile", "str", "ImageFile", "str"]
    assert document_text(src[12]) == "first\nthen\nand more"
    assert src[13] == {"parts": []} and document_text(src[13]) is None  # bad JSON
    with pytest.raises(FileNotFoundError):
        src[14]["parts"][0].load()


def test_image_jsonl_trains_through_the_loop_and_counts_skipped_records(corpus, tmp_path):
    from train import loop  # noqa: PLC0415

    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    config.data.kind = "image_jsonl"
    config.data.path = str(corpus / "*.jsonl")
    config.data.tokenizer = "hf"
    config.data.tokenizer_path = str(corpus / "tokenizer.json")
    config.data.eval_examples = 0
    config.train.steps = 8
    config.train.log_every = 4
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = 100
    config_schema.validate(config)
    summary = loop.run(config, str(tmp_path))
    losses = [r["loss"] for r in summary["rows"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    with open(tmp_path / "data_stats.json") as f:
        stats = json.load(f)
    assert (stats["records"], stats["documents_read"], stats["records_skipped"]) == (16, 13, 3)
    assert stats["images"] == 14 and stats["text_tokens"] > 0


def test_image_jsonl_needs_a_path():
    config = runpy.run_path(os.path.join(ROOT, "configs", "digits.py"))["get_config"]()
    config.data.kind = "image_jsonl"
    with pytest.raises(config_schema.ConfigValueError, match="data.path"):
        config_schema.validate(config)


def test_image_text_config_trains_sentencepiece_below_the_vision_ids(corpus, tmp_path):
    from train import prepare  # noqa: PLC0415

    config = runpy.run_path(os.path.join(ROOT, "configs", "image_text.py"))["get_config"]()
    config.data.path = str(corpus / "docs.jsonl")
    config.data.vocab_size = 300  # the model's vocabulary and vision ids follow
    model = config_schema.validate(config)
    assert model.text_config.vocab_size == 304
    ids = (model.vision_start_token_id, model.vision_end_token_id, model.image_token_id)
    assert ids == (300, 301, 302) and model.video_token_id == 303
    prepared = prepare.prepare_data(config, str(tmp_path))
    assert prepared.tokenizer.vocab_size == 300
    assert os.path.exists(tmp_path / "tokenizer" / "spm.model")
    assert (prepared.stats["records_skipped"], prepared.stats["images"]) == (3, 14)
    text = "a green square"
    assert prepared.tokenizer.decode(prepared.tokenizer.encode(text)) == text
