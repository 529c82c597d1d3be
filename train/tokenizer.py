"""Train a sentencepiece tokenizer on a corpus: `python -m train.tokenizer`.

    python -m train.tokenizer --kind=stdlib --output=/tmp/tok/spm.model --vocab_size=1024
    python -m train.tokenizer --kind=jsonl --path='data/*.jsonl' --output=spm.model

The model suits code and prose alike: byte-level BPE pieces with identity normalisation (no
whitespace folding, so indentation and newlines survive), whitespace-only pieces allowed, digits
split, unknown characters through byte fallback, so decode(encode(text)) == text. Special ids:
unk 0, bos 1, eos 2 (the document separator of packed rows), no pad piece (padding is marked by
segment id 0, never by a token).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from absl import app, flags

from train.data.sources import KINDS, decode_record, open_source

_PIECE_CHARS = 2000  # documents are fed to the trainer in pieces of about this many characters


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for i in range(0, len(text), _PIECE_CHARS):
            yield text[i : i + _PIECE_CHARS]


def train_sentencepiece(
    texts: Iterable[str], output: str, vocab_size: int, *, max_pieces: int = 200_000
) -> str:
    """Trains a BPE model on `texts`, writes it to `output` (a `.model` path); returns the path.

    The file is written to a temporary name and renamed, so a crash never leaves a partial model.
    """
    import sentencepiece as spm  # noqa: PLC0415

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp"
    with open(tmp, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_pieces(texts),
            model_writer=f,
            vocab_size=vocab_size,
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=False,
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9995,
            max_sentence_length=4 * _PIECE_CHARS,
            input_sentence_size=max_pieces,
            shuffle_input_sentence=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    os.replace(tmp, output)
    return output


def corpus_texts(
    kind: str,
    path: str,
    *,
    record_format: str = "text",
    text_key: str = "text",
    max_bytes: int = 0,
) -> Iterator[str]:
    """The readable documents of a source, in source order (unusable records are left out)."""
    if kind == "jsonl":
        record_format = "json"
    source = open_source(kind, path, max_bytes=max_bytes)
    for i in range(len(source)):
        text = decode_record(source[i], record_format, text_key)
        if text is not None:
            yield text


_KIND = flags.DEFINE_enum("kind", "stdlib", list(KINDS), "Source kind (see train/data/sources.py).")
_PATH = flags.DEFINE_string("path", "", "Glob(s) of the corpus files (stdlib: optional root).")
_FORMAT = flags.DEFINE_enum("record_format", "text", ["text", "json"], "ArrayRecord records.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "JSON field holding the document.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 3_000_000, "stdlib: corpus size cap (0: all).")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Number of pieces.")
_OUTPUT = flags.DEFINE_string("output", None, "Path of the .model file to write.", required=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    texts = corpus_texts(
        _KIND.value,
        _PATH.value,
        record_format=_FORMAT.value,
        text_key=_TEXT_KEY.value,
        max_bytes=_MAX_BYTES.value,
    )
    path = train_sentencepiece(texts, _OUTPUT.value, _VOCAB.value)
    print(f"wrote {path} ({_VOCAB.value} pieces)")


if __name__ == "__main__":
    app.run(main)
