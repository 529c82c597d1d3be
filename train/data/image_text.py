"""Image-text documents from JSON-lines files (`data.kind="image_jsonl"`).

One document per non-blank line of the files `data.path` matches (comma-separated globs), either
the general form, texts and images in reading order,

    {"parts": ["Look:", {"image": "img/0001.png"}, "a red square on grey.", {"image": ...}]}

or the image-caption shorthand

    {"image": "img/0001.png", "text": "a red square on grey."}     (= parts [image, text])

Image paths are relative to the JSONL file's directory (or absolute); any format Pillow reads,
converted to RGB uint8. The source only parses JSON: images are decoded by the multimodal encoder
(`ImageFile.load` inside its try), so a line that is not such JSON, or whose image is missing or
corrupt, becomes a skipped and counted record, never a fatal error. `document_text` gives the
text parts (the corpus a sentencepiece tokenizer is trained on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from train.data.sources import JsonlSource


@dataclass(frozen=True)
class ImageFile:
    """An image part not read yet: `load()` gives uint8 [H, W, 3] (raises if unreadable)."""

    path: str

    def load(self) -> np.ndarray:
        from PIL import Image  # noqa: PLC0415

        with Image.open(self.path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)


def parse_document(raw: bytes | None, base_dir: str) -> dict[str, Any]:
    """{"parts": [str | ImageFile, ...], "line": raw without its line break}; {"parts": []}
    (skipped downstream) for a bad line. The line is what the held-out split hashes
    (data/split.py)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        parts = obj["parts"] if "parts" in obj else [{"image": obj["image"]}, obj["text"]]
        out: list[Any] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("image"), str):
                out.append(ImageFile(os.path.join(base_dir, part["image"])))
            else:
                return {"parts": []}
        return {"parts": out, "line": raw.rstrip(b"\r\n")}
    except (AttributeError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {"parts": []}


def document_text(record: dict[str, Any]) -> str | None:
    """The document's text parts joined by newlines, or None when it has none."""
    text = "\n".join(p for p in record["parts"] if isinstance(p, str))
    return text if text.strip() else None


class ImageTextJsonl:
    """Random-access source of image-text documents (grain `RandomAccessDataSource`) over the
    lines of a `JsonlSource` (`sources.open_source("jsonl", data.path)`)."""

    def __init__(self, lines: JsonlSource):
        self._lines = lines
        self._dirs = [os.path.dirname(os.path.abspath(f)) for f in self._lines.files]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return parse_document(self._lines[index], self._dirs[self._lines.file_index(index)])

    def __repr__(self) -> str:
        return f"ImageTextJsonl({len(self)} documents in {len(self._dirs)} files)"
