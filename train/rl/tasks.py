"""Prompt sources of RL runs: the built-in addition and digits tasks, or JSON-lines records.

A record is a dict `{"prompt": str, "answer": str}`, with an optional `"image"` (JSON lines: a
path, relative to the file's directory or absolute; the digits task: a uint8 [H, W, 3] array)
that goes before the prompt, as in multimodal training (prompts.py). A task gives the training
records of step `s` (deterministic in the seed and the step, so a resumed run draws the same
prompts) and a fixed held-out list.

Built-in task "digits" (configs/rl_digits.py): scikit-learn's handwritten digits
(train/data/digits.py, the images of configs/digits.py's pretraining), prompt [image, "digit"],
answer the label ("7"); training records from the train split, held-out ones from the eval
split (images never trained on).

Built-in task "addition" (the embedded default of `python -m train.rl`): two numbers of
`ADD_DIGITS` digits, prompt "37+48=", answer "85", one character per token (`CHARS`, a
Hugging Face tokenizer.json written by `write_addition_files`). A tenth of
the pairs, drawn by a hash of (a, b), are held out: they are never in the pretraining corpus nor in
the RL prompts. The pretraining corpus (`configs/addition_pretrain.py`) writes the sum in its
usual order in a fraction `ADD_CORRECT` of the documents and with its digits reversed in the
others ("37+48=58"), so the pretrained model knows both forms and its greedy answer is mostly
the reversed one: exact-match accuracy starts low and RL, rewarding the right form only, raises
it (the curve is in README.md).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

CHARS = "0123456789+="
SPECIALS = ("<pad>", "<|endoftext|>")  # ids 0 and 1 (eos)
ADD_DIGITS = 2
ADD_CORRECT = 0.25
DIGITS_CORRECT = 0.25
_LO, _HI = 10 ** (ADD_DIGITS - 1), 10**ADD_DIGITS


def _held_out(a: int, b: int) -> bool:
    return random.Random(a * 1000 + b).random() < 0.1


def addition_record(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def addition_pairs(held_out: bool) -> list[tuple[int, int]]:
    return [(a, b) for a in range(_LO, _HI) for b in range(_LO, _HI) if _held_out(a, b) == held_out]


def addition_corpus(n: int, seed: int = 0, correct: float = ADD_CORRECT) -> list[str]:
    """`n` pretraining documents of training pairs: "a+b=sum", the sum's digits reversed in a
    fraction 1 - `correct` of them."""
    rng = random.Random(seed)
    pairs = addition_pairs(held_out=False)
    docs = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        s = str(a + b)
        docs.append(f"{a}+{b}={s if rng.random() < correct else s[::-1]}")
    return docs


def write_addition_files(directory: str | None = None, n_docs: int = 60_000) -> dict[str, str]:
    """The tokenizer.json and the pretraining corpus (JSON lines, key "text") of the addition
    task, written once (atomically) under `directory` (default: the temp dir); their paths."""
    directory = directory or os.path.join(tempfile.gettempdir(), "qwen35_jax_addition")
    os.makedirs(directory, exist_ok=True)
    paths = {
        "tokenizer": os.path.join(directory, "tokenizer.json"),
        "corpus": os.path.join(directory, f"corpus_v3_{n_docs}.jsonl"),
    }
    if not os.path.exists(paths["tokenizer"]):
        _write(paths["tokenizer"], char_tokenizer_json())
    if not os.path.exists(paths["corpus"]):
        lines = [json.dumps({"text": d}) for d in addition_corpus(n_docs)]
        _write(paths["corpus"], "\n".join(lines) + "\n")
    return paths


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def char_tokenizer_json(chars: str = CHARS) -> str:
    """A Hugging Face tokenizer.json: one token per character of `chars`, SPECIALS first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate((*SPECIALS, *chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok.to_str()


class Task:
    """Training records per step (deterministic) and held-out records."""

    def __init__(self, train: Sequence[dict[str, Any]], held_out: Sequence[dict[str, Any]], seed):
        if not train:
            raise ValueError("the task has no training records")
        self.train, self.held_out, self.seed = list(train), list(held_out), int(seed)

    def records(self, step: int, attempt: int, n: int) -> list[dict[str, Any]]:
        """`n` training records for `step` (attempt > 0: DAPO's refills of that step)."""
        rng = np.random.default_rng([self.seed, step, attempt])
        return [self.train[i] for i in rng.integers(0, len(self.train), size=n)]


def word_tokenizer_json(words: Sequence[str]) -> str:
    """A Hugging Face tokenizer.json with `WordTokenizer(words)`'s ids: <pad> 0, <eos> 1, <unk> 2,
    then `words`, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    specials = ("<pad>", "<eos>", "<unk>")
    vocab = {t: i for i, t in enumerate((*specials, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    return tok.to_str()


def digits_caption(label: int, index: int, correct: float = DIGITS_CORRECT) -> str:
    """The pretraining caption of train image `index`: "digit <label>" for a fraction `correct`
    of the images (drawn by a hash of the index), "digit <label + 1 mod 10>" for the others."""
    right = random.Random(7919 * index + 17).random() < correct
    return f"digit {label if right else (label + 1) % 10}"


def write_digits_files(
    directory: str | None = None, image_size: int = 32, correct: float = DIGITS_CORRECT
) -> dict[str, str]:
    """The digits RL demo's pretraining data, written once (atomically) under `directory`
    (default: the temp dir): the train split's images as PNG files, a JSON-lines corpus of
    image-caption documents (`digits_caption`) and the word tokenizer's tokenizer.json; their
    paths ("corpus", "tokenizer")."""
    from PIL import Image  # noqa: PLC0415

    from train.data import digits  # noqa: PLC0415 (scikit-learn: the digits extra)

    directory = directory or os.path.join(tempfile.gettempdir(), "qwen35_jax_digits_rl")
    tag = f"{image_size}px_{correct:g}"
    paths = {
        "tokenizer": os.path.join(directory, "tokenizer.json"),
        "corpus": os.path.join(directory, f"corpus_v1_{tag}.jsonl"),
    }
    if not os.path.exists(paths["tokenizer"]):
        os.makedirs(directory, exist_ok=True)
        _write(paths["tokenizer"], word_tokenizer_json(digits.WORDS))
    if not os.path.exists(paths["corpus"]):
        images, labels = digits.digit_images("train", image_size)
        os.makedirs(os.path.join(directory, f"images_{image_size}px"), exist_ok=True)
        lines = []
        for i, (x, y) in enumerate(zip(images, labels, strict=True)):
            name = f"images_{image_size}px/{i}.png"
            if not os.path.exists(os.path.join(directory, name)):
                tmp = os.path.join(directory, f"{name}.tmp-{os.getpid()}.png")
                Image.fromarray(x).save(tmp)
                os.replace(tmp, os.path.join(directory, name))
            lines.append(json.dumps({"image": name, "text": digits_caption(int(y), i, correct)}))
        _write(paths["corpus"], "\n".join(lines) + "\n")
    return paths


def digits_records(split: str, image_size: int) -> list[dict[str, Any]]:
    """The digits task's records of `split` ("train" | "eval")."""
    from train.data import digits  # noqa: PLC0415 (scikit-learn: the digits extra)

    images, labels = digits.digit_images(split, image_size)
    return [
        {"prompt": "digit", "answer": str(int(y)), "image": x}
        for x, y in zip(images, labels, strict=True)
    ]


def read_jsonl(path: str, key: str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line without "prompt", or with an "image" that is not a
    path string, is refused naming file and line. Image paths become absolute."""
    out = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{key}={path!r} line {i}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f'{key}={path!r} line {i}: expected {{"prompt": str, ...}}')
            if "image" in rec:
                if not isinstance(rec["image"], str):
                    raise ValueError(f'{key}={path!r} line {i}: "image" must be a path string')
                rec["image"] = os.path.join(base, rec["image"])
            out.append(rec)
    return out


def make_task(rl: Any, seed: int, image_size: int = 32) -> Task:
    """The task of `rl.task` ("addition", "digits" (images of `image_size` px), or "jsonl":
    `rl.prompts_path`, `rl.eval_path`)."""
    if rl.task == "addition":
        train = [addition_record(a, b) for a, b in addition_pairs(held_out=False)]
        held = [addition_record(a, b) for a, b in addition_pairs(held_out=True)]
        held = [held[i] for i in np.random.default_rng(1234).permutation(len(held))]
        return Task(train, held[: rl.eval_examples], seed)
    if rl.task == "digits":
        held = digits_records("eval", image_size)
        return Task(digits_records("train", image_size), held[: rl.eval_examples], seed)
    train = read_jsonl(rl.prompts_path, "rl.prompts_path")
    held = read_jsonl(rl.eval_path, "rl.eval_path") if rl.eval_path else []
    return Task(train, held[: rl.eval_examples], seed)
