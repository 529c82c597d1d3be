"""The grain multimodal pipeline: image-text documents -> packed rows with a fixed patch budget.

A record is a document {"parts": [part, ...]}, each part a text (str) or an image (uint8
[H, W, 3], or an `image_text.ImageFile`, decoded here): an image-caption pair is [image, caption];
an interleaved document alternates texts and images in reading order. `EncodeExample` turns one
document into

    tokens     int32 [L]        text ids; each image becomes vision_start, n image placeholders
                                (n = t*h*w / merge^2 of its grid), vision_end; eos at the end
    loss_mask  int32 [L]        1 on text tokens (and eos), 0 on vision_start / placeholders /
                                vision_end: a token with mask 0 is never a target
    pixels     float32 [P, F]   the document's patches (`processor.process_images`; F = 3 *
                                temporal_patch * patch^2), images in order
    grids      int32 [G, 3]     one (t, h, w) per image

Images are resized by the processor to multiples of patch * merge, within [ (patch * merge)^2,
patches_per_row * patch^2 ] pixels, so an image always fits an empty row's patch budget. A
document that does not fit an empty row (more than seq_len tokens, patches_per_row patches or
images_per_row images) or cannot be read is skipped and counted.

Packing (grain `FirstFitPackIterDataset`, `rows_per_shard` bins): each document goes to the first
row of the current batch where its tokens, patches and grids all still fit; when one fits none,
the batch is emitted and that document starts the next. Documents are never split, so an image's
placeholders and its patches always share a row. Every row has static shapes, zero padded:

    tokens, segment_ids (1, 2, ... per document; 0 = padding), loss_mask     int32 [T]
    pixel_values   float32 [P_row, F]   the row's documents' patches, then zero patches
    image_grid_thw int32 [G_row, 3]     their grids, then zero rows (count nothing)

This is the per-row form `qwen35_jax.apply` takes (row b's placeholders take row b's patches;
positions default to the 3-D rope index per document), so micro-batches and data-parallel
shards along B keep each row's pixels with it. Sharding over hosts, shuffling and the
checkpointable iterator are those of the text pipeline (iterator.py: `shard_plan`,
`DataIterator` with `MULTIMODAL_FIELDS`; input.py builds it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from qwen35_jax import Qwen35Config
from qwen35_jax.processor import process_images
from train.data.image_text import ImageFile
from train.data.pipeline import example_stream
from train.data.tokenizers import Tokenizer

# batch key -> packed dataset key (DataIterator's `fields`)
MULTIMODAL_FIELDS = {
    "tokens": "tokens",
    "segment_ids": "tokens_segment_ids",
    "loss_mask": "loss_mask",
    "pixel_values": "pixels",
    "image_grid_thw": "grids",
}


@dataclass(frozen=True)
class VisualSpec:
    """What the pipeline needs from the model config: special ids and the patch geometry."""

    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    @classmethod
    def of(cls, config: Qwen35Config) -> VisualSpec:
        v = config.vision_config
        if v is None:
            raise ValueError("multimodal data needs a model with a vision_config")
        return cls(
            config.image_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
            v.patch_size,
            v.temporal_patch_size,
            v.spatial_merge_size,
        )

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.image_token_id, self.vision_start_token_id, self.vision_end_token_id)


def encode_document(
    parts: list[Any],
    tokenizer: Tokenizer,
    spec: VisualSpec,
    *,
    max_patches: int,
    add_eos: bool = True,
) -> dict[str, np.ndarray]:
    """One document's tokens, loss_mask, pixels, grids (module docstring); raises if unusable.
    `add_eos=False` leaves the document open (a prompt to complete)."""
    images = [p.load() if isinstance(p, ImageFile) else p for p in parts if not isinstance(p, str)]
    tokens: list[int] = []
    mask: list[int] = []
    pixels_PF = np.zeros((0, spec.patch_dim), np.float32)
    grids_G3 = np.zeros((0, 3), np.int32)
    if images:
        factor = spec.patch_size * spec.merge_size
        out = process_images(
            images,
            patch_size=spec.patch_size,
            temporal_patch_size=spec.temporal_patch_size,
            merge_size=spec.merge_size,
            min_pixels=factor**2,
            max_pixels=max(factor**2, max_patches * spec.patch_size**2),
        )
        pixels_PF = out["pixel_values"].astype(np.float32)
        grids_G3 = out["image_grid_thw"].astype(np.int32)
    image_i = 0
    for part in parts:
        if isinstance(part, str):
            ids = tokenizer.encode(part)
            tokens += ids
            mask += [1] * len(ids)
            continue
        n = int(np.prod(grids_G3[image_i])) // spec.merge_size**2
        image_i += 1
        run = [spec.vision_start_token_id, *[spec.image_token_id] * n, spec.vision_end_token_id]
        tokens += run
        mask += [0] * len(run)
    if not tokens:
        raise ValueError("empty document")
    if add_eos:
        tokens.append(tokenizer.eos_id)
        mask.append(1)
    return {
        "tokens": np.asarray(tokens, np.int32),
        "loss_mask": np.asarray(mask, np.int32),
        "pixels": pixels_PF,
        "grids": grids_G3,
    }


class EncodeExample:
    """record -> encoded document, or {"tokens": []} (skipped and counted) when it is unusable
    or does not fit an empty row. Counts records read and skipped, as `TokenizeRecord` does;
    `select` (optional, a predicate on the record: data/split.py) drops the records it refuses
    before any image is decoded, counted as `held_out`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        spec: VisualSpec,
        *,
        seq_len: int,
        patches_per_row: int,
        images_per_row: int,
        select: Callable[[Any], bool] | None = None,
    ):
        self._tokenizer, self._spec = tokenizer, spec
        self._limits = {"tokens": seq_len, "pixels": patches_per_row, "grids": images_per_row}
        self._select = select
        self._lock = threading.Lock()
        self.records = 0
        self.skipped = 0
        self.held_out = 0

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        if self._select is not None and not self._select(raw):
            with self._lock:
                self.held_out += 1
            return {"tokens": np.zeros((0,), np.int32)}
        try:
            ex = encode_document(
                list(raw["parts"]),
                self._tokenizer,
                self._spec,
                max_patches=self._limits["pixels"],
            )
            fits = all(len(ex[k]) <= n for k, n in self._limits.items())
        except Exception:  # noqa: BLE001 - any unusable record is skipped, never fatal
            ex, fits = None, False
        with self._lock:
            self.records += 1
            self.skipped += not fits
        if not fits:
            return {"tokens": np.zeros((0,), np.int32)}
        return ex


def build_multimodal_dataset(
    source: Any,
    encode: EncodeExample,
    *,
    seq_len: int,
    patches_per_row: int,
    images_per_row: int,
    rows_per_shard: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 1,
) -> grain.IterDataset:
    """The packed, batched dataset of one virtual shard: shard, shuffle(seed), repeat, encode,
    drop skipped, first-fit pack into `rows_per_shard` rows, batch."""
    examples = example_stream(
        source, encode, seed, shard_index, shard_count, read_threads, 8 * rows_per_shard
    )
    return pack_documents(
        examples,
        seq_len=seq_len,
        patches_per_row=patches_per_row,
        images_per_row=images_per_row,
        rows=rows_per_shard,
        seed=seed,
    )


def pack_documents(
    examples: grain.IterDataset,
    *,
    seq_len: int,
    patches_per_row: int,
    images_per_row: int,
    rows: int,
    seed: int,
) -> grain.IterDataset:
    """First-fit packing of encoded documents into `rows` rows per batch (module docstring; a
    last partial batch is dropped): the training pipeline's and held-out evaluation's."""
    lengths = {
        "tokens": seq_len,
        "loss_mask": seq_len,
        "pixels": patches_per_row,
        "grids": images_per_row,
    }
    packed = FirstFitPackIterDataset(
        examples,
        length_struct=lengths,
        num_packing_bins=rows,
        seed=seed,
        shuffle_bins=False,
    )
    return packed.batch(rows, drop_remainder=True)


def batch_shapes(
    rows: int, seq_len: int, patches_per_row: int, images_per_row: int, patch_dim: int
) -> dict[str, tuple[int, ...]]:
    """The global shapes of a multimodal batch, per key (for shardings before any data)."""
    return {
        "tokens": (rows, seq_len),
        "segment_ids": (rows, seq_len),
        "loss_mask": (rows, seq_len),
        "pixel_values": (rows, patches_per_row, patch_dim),
        "image_grid_thw": (rows, images_per_row, 3),
    }
