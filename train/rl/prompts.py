"""Records -> prompt token ids, and for image records their patches, exactly as in training.

    encode(records, tokenizer, max_len, spec, max_patches) -> Prompts(rows, pixel_values,
                                                                      image_grid_thw)

A text record's prompt is `tokenizer.encode(record["prompt"])`. A record with an `"image"` (a
uint8 [H, W, 3] array, or a path: `ImageFile`, read here) is the document [image, prompt] of the
multimodal pipeline (`train.data.multimodal.encode_document`, no eos): vision_start, the
image's t*h*w / merge^2 placeholders, vision_end, then the prompt's ids, the image resized by
the processor to at most `max_patches` patches. Its patches go in the per-row form that
`qwen35_jax.generate` and `qwen35_jax.apply` take (and the trainer's step):

    pixel_values     float32 [B, P, F]   row b's patches, zero padded to P = max_patches
    image_grid_thw   int32   [B, 1, 3]   row b's grid (t, h, w); a zero row for a text record

so every step's arrays have one shape (one compile) and rows shard along B with their pixels.
Without any image record both are None (text-only generate and forward).

A completion is context of the policy's forward pass, where a vision special id (placeholder,
vision_start / vision_end) would count as an image: `cut_at_vision_ids` ends such a completion
before the first one (the rollout then counts it as truncated). A trained model never emits
them (they are never targets in training); a random one does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from train.data.image_text import ImageFile
from train.data.multimodal import VisualSpec, encode_document


class Prompts(NamedTuple):
    rows: list[list[int]]
    pixel_values: np.ndarray | None  # float32 [B, P, F]
    image_grid_thw: np.ndarray | None  # int32 [B, 1, 3]

    def visual(self) -> dict[str, np.ndarray]:
        """generate's / apply's keyword arguments for the images ({} without any)."""
        if self.pixel_values is None:
            return {}
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


def has_images(records: list[dict[str, Any]]) -> bool:
    return any(r.get("image") is not None for r in records)


def encode(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_len: int,
    spec: VisualSpec | None = None,
    max_patches: int = 0,
) -> Prompts:
    """The prompts of `records` (module docstring); a prompt over `max_len` tokens, or an image
    record without a vision model (`spec` None), raises ValueError naming it."""
    if not has_images(records):
        return Prompts([_text_ids(tokenizer, r["prompt"], max_len) for r in records], None, None)
    if spec is None:
        raise ValueError(
            f"record {records[0]['prompt'][:40]!r}... has an image but the model has no "
            "vision_config"
        )
    rows: list[list[int]] = []
    pixels_BPF = np.zeros((len(records), max_patches, spec.patch_dim), np.float32)
    grids_BG3 = np.zeros((len(records), 1, 3), np.int32)
    for b, r in enumerate(records):
        image = r.get("image")
        if image is None:
            rows.append(_text_ids(tokenizer, r["prompt"], max_len))
            continue
        if isinstance(image, str):
            image = ImageFile(image)
        doc = encode_document(
            [image, r["prompt"]], tokenizer, spec, max_patches=max_patches, add_eos=False
        )
        _check_len(doc["tokens"], r["prompt"], max_len)
        rows.append(doc["tokens"].tolist())
        pixels_BPF[b, : len(doc["pixels"])] = doc["pixels"]
        grids_BG3[b] = doc["grids"]
    return Prompts(rows, pixels_BPF, grids_BG3)


def _text_ids(tokenizer: Any, text: str, max_len: int) -> list[int]:
    ids = list(tokenizer.encode(text))
    _check_len(ids, text, max_len)
    return ids


def _check_len(ids, text: str, max_len: int) -> None:
    if len(ids) == 0 or len(ids) > max_len:
        raise ValueError(
            f"prompt {text[:40]!r} has {len(ids)} tokens; rl.max_prompt_len={max_len} "
            "(and at least one token) expected"
        )


def cut_at_vision_ids(
    tokens_BN: np.ndarray, lengths_B: np.ndarray, spec: VisualSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(lengths_B, cut_B): each completion ended before its first vision special id."""
    n = tokens_BN.shape[1]
    stray_BN = np.isin(tokens_BN, spec.special_ids) & (np.arange(n) < lengths_B[:, None])
    first_B = np.where(stray_BN.any(axis=1), stray_BN.argmax(axis=1), n)
    return np.minimum(lengths_B, first_B).astype(lengths_B.dtype), stray_BN.any(axis=1)
