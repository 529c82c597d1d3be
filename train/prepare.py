"""Everything a run reads before training: the record source, the tokenizer, corpus statistics.

Tokenizer, in order: `data.tokenizer_path` if set; else the `tokenizer.json` of `init.from_hf`
(or of a converted `init.from_checkpoint`, which `hf-to-orbax` copies along); else a
sentencepiece model of `data.vocab_size` pieces trained on the corpus into
`<workdir>/tokenizer/spm.model` (once: a resumed run reuses it, so token ids never change).

Statistics (`<workdir>/data_stats.json`, also computed once): documents read and skipped, the
token count and the unigram entropy H = -sum_v p_v ln p_v (nats/token, eos included as the
separator the model predicts) of up to `_STATS_TOKENS` training tokens. A model that learns only
token frequencies reaches a loss of H; the loss of a model that uses context falls below it.

Held-out evaluation documents (`eval_documents`, evaluation.py reads them) are opened here too:
`data.eval_path` (files of data.kind), the documents of the training source that data/split.py
holds out (`data.eval_fraction`; `train_select` keeps the others), or for digits their own
held-out images (data/digits.py, asked for by `train.eval_every`). The tokenizer a run trains
never sees a held-out document, and the statistics count them apart: `eval_documents` /
`eval_tokens` (held-out documents among the records scanned, or of the eval source, up to
`_STATS_TOKENS`) beside the training side's `documents_read` / `tokens`.

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
from collections.abc import Callable
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
from train.data.mixture import MixtureSource, parse_mixture
from train.data.multimodal import EncodeExample, VisualSpec
from train.data.sources import decode_record, decode_with_reason, open_source
from train.data.split import SplitSide
from train.data.tokenizers import Tokenizer, WordTokenizer, load_tokenizer
from train.tokenizer import train_sentencepiece

_STATS_TOKENS = 2_000_000


@dataclass
class PreparedData:
    source: Any
    decode: Any  # raw record -> text | None (text kinds; None for multimodal kinds)
    tokenizer: Tokenizer
    stats: dict[str, Any]
    eval: EvalDocuments | None = None  # held-out evaluation's documents, when asked for


@dataclass(frozen=True)
class EvalDocuments:
    """Where held-out evaluation reads: `source` (records), those `select` accepts (None: all);
    `key` is the setting that chose them (named in errors). `train_select` is the training
    side's predicate when the documents are held out of the training source, else None."""

    source: Any
    select: Callable[[Any], bool] | None
    key: str
    train_select: Callable[[Any], bool] | None = None


def eval_wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for held-out evaluation (digits: `train.eval_every`, their
    held-out images being built in)."""
    d = config.data
    if d.kind == "digits":
        return bool(config.train.eval_every)
    return bool(d.eval_path or d.eval_fraction)


def eval_documents(config: ml_collections.ConfigDict, source: Any) -> EvalDocuments | None:
    """The held-out evaluation documents of `config` (module docstring), `source` being the
    training source; ConfigValueError naming data.eval_path when its files are missing."""
    d = config.data
    if not eval_wanted(config):
        return None
    if d.kind == "digits":
        held = digits.DigitsSource("eval", d.image_size, d.images_per_doc)
        return EvalDocuments(held, None, "train.eval_every")
    if d.eval_fraction:
        keep, held = SplitSide(d.eval_fraction, False), SplitSide(d.eval_fraction, True)
        return EvalDocuments(source, held, "data.eval_fraction", train_select=keep)
    try:
        if d.kind == "image_jsonl":
            other = ImageTextJsonl(open_source("jsonl", d.eval_path))
        else:
            other = open_source(d.kind, d.eval_path, max_bytes=d.max_bytes, text_key=d.text_key)
    except (FileNotFoundError, ValueError) as e:
        message = str(e).replace("data.path=", "data.eval_path=")
        raise config_schema.ConfigValueError(message) from None
    return EvalDocuments(other, None, "data.eval_path")


def _record_format(data: ml_collections.ConfigDict) -> str:
    if data.kind == "parquet" or data.mixture:
        return "text"  # the column's value / the mixture's decoded record is the document
    return "json" if data.kind == "jsonl" else data.record_format


def _texts(source: Any, decode: Any, select: Callable[[Any], bool] | None = None):
    """The documents' texts, those `select` refuses (held out) left out."""
    for i in range(len(source)):
        raw = source[i]
        if select is not None and not select(raw):
            continue
        text = decode(raw)
        if text is not None:
            yield text


def _tokenizer_dir(config: ml_collections.ConfigDict) -> str | None:
    """The checkpoint whose tokenizer.json to use: init.from_hf, or a converted from_checkpoint."""
    ckpt = config.init.from_checkpoint
    side = ckpt if ckpt and os.path.isfile(os.path.join(ckpt, "tokenizer.json")) else None
    return config.init.from_hf or side


def _tokenizer(
    data: ml_collections.ConfigDict,
    workdir: str,
    from_hf: str | None,
    source: Any,
    decode: Any,
    select: Callable[[Any], bool] | None = None,
) -> Tokenizer:
    """The run's tokenizer (module docstring); a trained one sees the documents `select`
    accepts (the training side of a held-out split) only."""
    if data.tokenizer_path:
        try:
            return load_tokenizer(data.tokenizer, data.tokenizer_path)
        except (OSError, ValueError) as e:
            raise config_schema.ConfigValueError(f"data.tokenizer_path: {e}") from None
    if from_hf:
        if not os.path.isfile(os.path.join(from_hf, "tokenizer.json")):
            raise config_schema.ConfigValueError(
                f"{os.path.join(from_hf, 'tokenizer.json')} does not exist: the checkpoint of "
                "init.from_hf has no tokenizer; set data.tokenizer_path (and data.tokenizer) to "
                "the tokenizer its weights were trained with"
            )
        return load_tokenizer("hf", from_hf)
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        logging.info("training a %d-piece sentencepiece tokenizer on %r", data.vocab_size, source)
        print(f"training a {data.vocab_size}-piece sentencepiece tokenizer -> {path}", flush=True)
        train_sentencepiece(_texts(source, decode, select), path, data.vocab_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer trained")
    return load_tokenizer("sentencepiece", path)


def _reasons_text(reasons: collections.Counter[str] | dict[str, int]) -> str:
    return ", ".join(
        f"{n} record{'s' * (n != 1)}: {why}"
        for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])
    )


def check_usable(source: Any, data: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigValueError naming data.path and why) a source without a single usable
    record, before a tokenizer is trained or a step runs; stops at the first usable record."""
    reasons: collections.Counter[str] = collections.Counter()
    fmt = _record_format(data)
    for i in range(len(source)):
        text, why = decode_with_reason(source[i], fmt, data.text_key)
        if text is not None:
            return
        reasons[why] += 1
    what = f"data.path={data.path!r}" if data.path else f"data.kind={data.kind!r}"
    if not reasons:
        raise config_schema.ConfigValueError(f"{what}: no records ({source!r})")
    key = f" (data.text_key={data.text_key!r})" if fmt == "json" else ""
    raise config_schema.ConfigValueError(
        f"{what}: no usable records in {source!r}{key}: {_reasons_text(reasons)}"
    )


def describe(stats: dict[str, Any]) -> str:
    """The console `data:` line: records, tokens, skipped records and why, unigram entropy,
    held-out documents."""
    skipped = stats.get("records_skipped", 0)
    why = stats.get("skip_reasons") or {}
    line = f"data: {stats['records']} records"
    if skipped:
        line += f" ({skipped} skipped" + (f": {_reasons_text(why)})" if why else ")")
    line += (
        f", {stats['tokens']:,} tokens sampled; unigram entropy "
        f"{stats['unigram_entropy_nats']:.3f} nats/token ({stats['unigram_entropy_bits']:.2f} bits)"
    )
    if "images" in stats:
        line += f"; {stats['images']:,} images, {stats['patches']:,} patches"
    if "eval_documents" in stats:
        line += (
            f"; held out for evaluation: {stats['eval_documents']:,} documents, "
            f"{stats['eval_tokens']:,} tokens"
        )
    return line


def _load_or_compute_stats(path: str, compute: Any) -> dict[str, Any]:
    """`data_stats.json` (computed once; written atomically); an unreadable one is named in a
    warning and recomputed."""
    if os.path.exists(path):
        try:
            with open(path) as f:
                stats = json.load(f)
            if isinstance(stats, dict) and "tokens" in stats:
                return stats
            problem = "not a statistics record"
        except (OSError, ValueError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if jax.process_index() == 0:
            print(f"warning: {path} is unreadable ({problem}); recomputing it", flush=True)
    stats = compute()
    if jax.process_index() == 0:
        write_atomic(path, json.dumps(stats, indent=1))
    return stats


def write_atomic(path: str, text: str) -> None:
    """Writes `path` whole or not at all (a temporary file beside it, then one rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _text_tokens(decode: Any, tokenizer: Tokenizer) -> Callable[[Any], tuple[list[int], str]]:
    """raw record -> (its ids + eos, or [] when unusable; why it is unusable)."""

    def tokens(raw: Any) -> tuple[list[int], str]:
        text, why = decode(raw)
        if text is None:
            return [], why
        ids = tokenizer.encode(text)
        return ([*ids, tokenizer.eos_id], "") if ids else ([], "no tokens")

    return tokens


def _eval_counts(
    source: Any, select: Callable[[Any], bool] | None, tokens: Callable[[Any], Any]
) -> dict[str, int]:
    """Held-out documents and tokens of a separate evaluation source (up to _STATS_TOKENS)."""
    docs = total = 0
    for i in range(len(source)):
        raw = source[i]
        if select is not None and not select(raw):
            continue
        n = len(tokens(raw)[0])
        docs, total = docs + (n > 0), total + n
        if total >= _STATS_TOKENS:
            break
    return {"eval_documents": docs, "eval_tokens": total}


def _corpus_stats(
    source: Any, decode: Any, tokenizer: Tokenizer, held: EvalDocuments | None = None
) -> dict[str, Any]:
    counts: collections.Counter[int] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    docs = skipped = total = eval_docs = eval_total = 0
    tokens = _text_tokens(decode, tokenizer)
    keep = held.train_select if held is not None else None
    for i in range(len(source)):
        raw = source[i]
        ids, why = tokens(raw)
        if keep is not None and not keep(raw):  # held out: evaluation's, counted apart
            eval_docs, eval_total = eval_docs + bool(ids), eval_total + len(ids)
            continue
        if not ids:
            skipped += 1
            reasons[why] += 1
            continue
        counts.update(ids)
        docs += 1
        total += len(ids)
        if total >= _STATS_TOKENS:
            break
    entropy = _entropy(counts, total)
    stats = {
        "records": len(source),
        "documents_read": docs,
        "records_skipped": skipped,
        "skip_reasons": dict(reasons),
        "tokens": total,
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
    }
    if held is not None and keep is not None:
        stats.update(eval_documents=eval_docs, eval_tokens=eval_total)
    elif held is not None:
        stats.update(_eval_counts(held.source, held.select, tokens))
    return stats


def _entropy(counts: collections.Counter[int], total: int) -> float:
    return -sum(n / total * math.log(n / total) for n in counts.values()) if total else 0.0


def multimodal_encoder(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    spec: VisualSpec,
    select: Callable[[Any], bool] | None = None,
) -> EncodeExample:
    """The per-document step of the multimodal pipeline, with this config's budgets (`select`:
    the records it keeps, data/split.py)."""
    return EncodeExample(
        tokenizer,
        spec,
        seq_len=config.train.seq_len,
        patches_per_row=config.data.patches_per_row,
        images_per_row=config.data.images_per_row,
        select=select,
    )


def _multimodal_stats(
    source: Any, encode: EncodeExample, held: EvalDocuments | None = None
) -> dict[str, Any]:
    counts: collections.Counter[int] = collections.Counter()
    docs = total = images = patches = eval_docs = eval_total = 0
    keep = held.train_select if held is not None else None
    skipped = 0
    for i in range(len(source)):
        raw = source[i]
        ex = encode(raw)
        if keep is not None and not keep(raw):  # held out: evaluation's, counted apart
            eval_docs, eval_total = (
                eval_docs + bool(len(ex["tokens"])),
                eval_total + len(ex["tokens"]),
            )
            continue
        if not len(ex["tokens"]):
            skipped += 1
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
    stats = {
        "records": len(source),
        "documents_read": docs,
        "records_skipped": skipped,
        "tokens": total,
        "text_tokens": text,
        "images": images,
        "patches": patches,
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
    }
    if held is not None and keep is not None:
        stats.update(eval_documents=eval_docs, eval_tokens=eval_total)
    elif held is not None:
        stats.update(_eval_counts(held.source, None, lambda raw: (encode(raw)["tokens"], "")))
    return stats


def _prepare_multimodal(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
    data = config.data
    if data.kind == "digits":
        source = digits.DigitsSource("train", data.image_size, data.images_per_doc)
        held = eval_documents(config, source)
        tokenizer = WordTokenizer(digits.WORDS)
    else:  # image_jsonl
        source = ImageTextJsonl(open_source("jsonl", data.path))
        held = eval_documents(config, source)
        keep = held.train_select if held is not None else None
        tokenizer = _tokenizer(data, workdir, _tokenizer_dir(config), source, document_text, keep)
    spec = VisualSpec.of(config_schema.model_config(config))
    if tokenizer.vocab_size > min(spec.special_ids):
        raise config_schema.ConfigValueError(
            f"model.image_token_id / vision_start_token_id / vision_end_token_id {spec.special_ids}"
            f" must lie above the tokenizer's {tokenizer.vocab_size} ids"
        )
    stats = _load_or_compute_stats(
        os.path.join(workdir, "data_stats.json"),
        lambda: _multimodal_stats(source, multimodal_encoder(config, tokenizer, spec), held),
    )
    if stats["documents_read"] == 0:
        raise config_schema.ConfigValueError(
            f"no document of {source!r} fits an empty row: train.seq_len="
            f"{config.train.seq_len}, data.patches_per_row={data.patches_per_row}, "
            f"data.images_per_row={data.images_per_row} are too small"
        )
    return PreparedData(source, None, tokenizer, stats, held)


def _open_training_source(data: ml_collections.ConfigDict) -> Any:
    """`data.kind` / `data.path`'s source, or the MixtureSource of `data.mixture`."""
    if not data.mixture:
        return open_source(data.kind, data.path, max_bytes=data.max_bytes, text_key=data.text_key)
    entries = parse_mixture(data.mixture)
    sources = []
    for e in entries:
        try:
            kw = dict(max_bytes=data.max_bytes, text_key=data.text_key)
            sources.append(open_source(e.kind, e.path, **kw))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"data.mixture entry {e.name}: {err}") from None
    return MixtureSource(sources, entries, data.text_key)


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
    """Opens the source, loads or trains the tokenizer, loads or computes the statistics."""
    data = config.data
    if data.kind in config_schema.MULTIMODAL_KINDS:
        return _prepare_multimodal(config, workdir)
    try:
        source = _open_training_source(data)
    except (FileNotFoundError, ValueError) as e:
        raise config_schema.ConfigValueError(str(e)) from None
    check_usable(source, data)
    decode = partial(decode_record, record_format=_record_format(data), text_key=data.text_key)
    held = eval_documents(config, source)
    keep = held.train_select if held is not None else None
    tokenizer = _tokenizer(data, workdir, _tokenizer_dir(config), source, decode, keep)
    with_reason = partial(
        decode_with_reason, record_format=_record_format(data), text_key=data.text_key
    )
    stats = _load_or_compute_stats(
        os.path.join(workdir, "data_stats.json"),
        lambda: _corpus_stats(source, with_reason, tokenizer, held),
    )
    if stats["documents_read"] == 0:
        raise config_schema.ConfigValueError(
            f"data.path={data.path!r}: no record of {source!r} gives any token with this "
            f"tokenizer ({_reasons_text(stats.get('skip_reasons') or {})})"
        )
    return PreparedData(source, decode, tokenizer, stats, held)
