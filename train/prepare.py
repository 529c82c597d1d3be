"""Everything a run reads before training: the record source, the tokenizer, corpus statistics.

Tokenizer, in order: `data.tokenizer_path` if set; else the `tokenizer.json` of `init.from_hf`
(or of a converted `init.from_checkpoint`, which `hf-to-orbax` copies along); else a
sentencepiece model of `data.vocab_size` pieces trained on the corpus into
`<workdir>/tokenizer/spm.model` (once: a resumed run reuses it, so token ids never change).

Statistics (`<workdir>/data_stats.json`, also computed once): documents read and skipped, the
token count and the unigram entropy H = -sum_v p_v ln p_v (nats/token, eos included as the
separator the model predicts) of up to `_STATS_TOKENS` training tokens. A model that learns only
token frequencies reaches a loss of H; the loss of a model that uses context falls below it.

Multimodal kinds: the source is a document source, `data.kind="digits"` (data/digits.py, with
its fixed word list, `WordTokenizer`) or `"image_jsonl"` (data/image_text.py: JSON-lines
image-text documents; the tokenizer as above, a sentencepiece model trained on the text parts).
The statistics count documents, images, patches and tokens, with H over the tokens that are
targets (loss_mask 1: text and eos). A run whose documents fit no empty row (seq_len, patch or
image budget) stops here, naming the keys.
"""

from __future__ import annotations

import collections
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from train import config_schema
from train.data import digits
from train.data.image_text import ImageTextJsonl, document_text
from train.data.multimodal import EncodeExample, VisualSpec
from train.data.sources import decode_record, open_source
from train.data.tokenizers import Tokenizer, WordTokenizer, load_tokenizer
from train.tokenizer import train_sentencepiece

_STATS_TOKENS = 2_000_000


@dataclass
class PreparedData:
    source: Any
    decode: Any  # raw record -> text | None
    tokenizer: Tokenizer
    stats: dict[str, Any]


def _record_format(data: ml_collections.ConfigDict) -> str:
    return "json" if data.kind == "jsonl" else data.record_format


def _texts(source: Any, decode: Any):
    for i in range(len(source)):
        text = decode(source[i])
        if text is not None:
            yield text


def _tokenizer_dir(config: ml_collections.ConfigDict) -> str | None:
    """The checkpoint whose tokenizer.json to use: init.from_hf, or a converted from_checkpoint."""
    ckpt = config.init.from_checkpoint
    side = ckpt if ckpt and os.path.isfile(os.path.join(ckpt, "tokenizer.json")) else None
    return config.init.from_hf or side


def _tokenizer(
    data: ml_collections.ConfigDict, workdir: str, from_hf: str | None, source, decode
) -> Tokenizer:
    if data.tokenizer_path:
        return load_tokenizer(data.tokenizer, data.tokenizer_path)
    if from_hf:
        return load_tokenizer("hf", from_hf)
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        logging.info("training a %d-piece sentencepiece tokenizer on %r", data.vocab_size, source)
        print(f"training a {data.vocab_size}-piece sentencepiece tokenizer -> {path}", flush=True)
        train_sentencepiece(_texts(source, decode), path, data.vocab_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer trained")
    return load_tokenizer("sentencepiece", path)


def _corpus_stats(source: Any, decode: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    counts: collections.Counter[int] = collections.Counter()
    docs = skipped = total = 0
    for i in range(len(source)):
        text = decode(source[i])
        if text is None:
            skipped += 1
            continue
        ids = tokenizer.encode(text)
        counts.update(ids)
        counts[tokenizer.eos_id] += 1
        docs += 1
        total += len(ids) + 1
        if total >= _STATS_TOKENS:
            break
    entropy = _entropy(counts, total)
    return {
        "records": len(source),
        "documents_read": docs,
        "records_skipped": skipped,
        "tokens": total,
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
    }


def _entropy(counts: collections.Counter[int], total: int) -> float:
    return -sum(n / total * math.log(n / total) for n in counts.values()) if total else 0.0


def multimodal_encoder(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, spec: VisualSpec
) -> EncodeExample:
    """The per-document step of the multimodal pipeline, with this config's budgets."""
    return EncodeExample(
        tokenizer,
        spec,
        seq_len=config.train.seq_len,
        patches_per_row=config.data.patches_per_row,
        images_per_row=config.data.images_per_row,
    )


def _multimodal_stats(source: Any, encode: EncodeExample) -> dict[str, Any]:
    counts: collections.Counter[int] = collections.Counter()
    docs = total = images = patches = 0
    for i in range(len(source)):
        ex = encode(source[i])
        if not len(ex["tokens"]):
            continue
        docs += 1
        total += len(ex["tokens"])
        images += len(ex["grids"])
        patches += len(ex["pixels"])
        counts.update(ex["tokens"][ex["loss_mask"] == 1].tolist())
        if total >= _STATS_TOKENS:
            break
    text = sum(counts.values())
    entropy = _entropy(counts, text)
    return {
        "records": len(source),
        "documents_read": docs,
        "records_skipped": encode.skipped,
        "tokens": total,
        "text_tokens": text,
        "images": images,
        "patches": patches,
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
    }


def _prepare_multimodal(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
    data = config.data
    if data.kind == "digits":
        source = digits.DigitsSource("train", data.image_size, data.images_per_doc)
        tokenizer = WordTokenizer(digits.WORDS)
    else:  # image_jsonl
        source = ImageTextJsonl(open_source("jsonl", data.path))
        tokenizer = _tokenizer(data, workdir, _tokenizer_dir(config), source, document_text)
    spec = VisualSpec.of(config_schema.model_config(config))
    if tokenizer.vocab_size > min(spec.special_ids):
        raise config_schema.ConfigValueError(
            f"model.image_token_id / vision_start_token_id / vision_end_token_id {spec.special_ids}"
            f" must lie above the tokenizer's {tokenizer.vocab_size} ids"
        )
    stats_path = os.path.join(workdir, "data_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
    else:
        stats = _multimodal_stats(source, multimodal_encoder(config, tokenizer, spec))
        if jax.process_index() == 0:
            with open(stats_path, "w") as f:
                json.dump(stats, f, indent=1)
    if stats["documents_read"] == 0:
        raise config_schema.ConfigValueError(
            f"no document of {source!r} fits an empty row: train.seq_len="
            f"{config.train.seq_len}, data.patches_per_row={data.patches_per_row}, "
            f"data.images_per_row={data.images_per_row} are too small"
        )
    return PreparedData(source, None, tokenizer, stats)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
    """Opens the source, loads or trains the tokenizer, loads or computes the statistics."""
    data = config.data
    if data.kind in config_schema.MULTIMODAL_KINDS:
        return _prepare_multimodal(config, workdir)
    source = open_source(data.kind, data.path, max_bytes=data.max_bytes)
    decode = partial(decode_record, record_format=_record_format(data), text_key=data.text_key)
    tokenizer = _tokenizer(data, workdir, _tokenizer_dir(config), source, decode)
    stats_path = os.path.join(workdir, "data_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
    else:
        stats = _corpus_stats(source, decode, tokenizer)
        if jax.process_index() == 0:
            with open(stats_path, "w") as f:
                json.dump(stats, f, indent=1)
    return PreparedData(source, decode, tokenizer, stats)
