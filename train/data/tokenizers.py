"""Tokenizers behind one small interface: sentencepiece models and Hugging Face tokenizer.json.

    kind "sentencepiece"  a `*.model` file (train one with `python -m train.tokenizer`)
    kind "hf"             a `tokenizer.json` file, or a checkpoint directory holding one
                          (Qwen's own tokenizer when continuing from converted weights)
    WordTokenizer         a fixed word list (the built-in digits captions; no file)

Every document is encoded without special tokens and followed by `eos_id`, the separator the
packed rows carry between documents. For Hugging Face tokenizers `eos_id` is the first of
`<|endoftext|>`, `</s>`, `<eos>`, `<|im_end|>` found in the vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

KINDS = ("sentencepiece", "hf")
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm  # noqa: PLC0415 (optional dependency of one kind)

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} has no eos piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer  # noqa: PLC0415

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.path = path
        self._tok = _Tokenizer.from_file(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        ids = [self._tok.token_to_id(t) for t in _HF_EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{path}: none of {_HF_EOS_CANDIDATES} is in the vocabulary")
        self.eos_id = int(found[0])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(kind: str, path: str) -> Tokenizer:
    """The tokenizer of `data.tokenizer` (kind) at `data.tokenizer_path`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "hf":
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={kind!r} must be one of {KINDS}")


class WordTokenizer:
    """A fixed word vocabulary: ids 0 <pad>, 1 <eos>, 2 <unk>, then `words` in order.

    `encode` splits on whitespace (unknown words -> <unk>); `decode` joins with spaces. Used by
    the built-in image-caption data (`data.kind="digits"`), whose captions use a dozen words.
    """

    SPECIALS = ("<pad>", "<eos>", "<unk>")

    def __init__(self, words: Sequence[str]):
        self.words = (*self.SPECIALS, *words)
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError(f"WordTokenizer words must be distinct, got {list(words)}")
        self.vocab_size = len(self.words)
        self.eos_id = 1
        self.unk_id = 2

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(
            self.words[int(i)] if 0 <= int(i) < self.vocab_size else "<unk>" for i in ids
        )
