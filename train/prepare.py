"""Everything a run reads before training: the record source, the tokenizer, corpus statistics.

Tokenizer, in order: `data.tokenizer_path` if set; else the `tokenizer.json` of `init.from_hf`
(or of a converted `init.from_checkpoint`, which `hf-to-orbax` copies along); else a
sentencepiece model of `data.vocab_size` pieces trained on the corpus into
`<workdir>/tokenizer/spm.model` (once: a resumed run reuses it, so token ids never change).

Statistics (`<workdir>/data_stats.json`, also computed once): documents read and skipped, the
token count and the unigram entropy H = -sum_v p_v ln p_v (nats/token, eos included as the
separator the model predicts) of up to `_STATS_TOKENS` training tokens. A model that learns only
token frequencies reaches a loss of H; the loss of a model that uses context falls below it.
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

from train.data.sources import decode_record, open_source
from train.data.tokenizers import Tokenizer, load_tokenizer
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
    entropy = -sum(n / total * math.log(n / total) for n in counts.values()) if total else 0.0
    return {
        "records": len(source),
        "documents_read": docs,
        "records_skipped": skipped,
        "tokens": total,
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
    }


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
    """Opens the source, loads or trains the tokenizer, loads or computes the statistics."""
    data = config.data
    source = open_source(data.kind, data.path, max_bytes=data.max_bytes)
    decode = partial(decode_record, record_format=_record_format(data), text_key=data.text_key)
    ckpt = config.init.from_checkpoint
    side = ckpt if ckpt and os.path.isfile(os.path.join(ckpt, "tokenizer.json")) else None
    tokenizer = _tokenizer(data, workdir, config.init.from_hf or side, source, decode)
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
