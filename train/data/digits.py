"""Real images shipped inside a package: scikit-learn's 8x8 handwritten digits, captioned.

    pip install -e '.[digits]'          (scikit-learn; `sklearn.datasets.load_digits`)

The 1,797 grey 8x8 images (values 0..16) are scaled to uint8 0..255, upscaled (bilinear) to
`image_size` x `image_size` and repeated over three channels. The first `TRAIN_IMAGES` images
train, the remaining 297 are held out for `eval_examples` (caption_eval.py).

A document (one source record) is a list of parts, images and texts in reading order:

    images_per_doc = 1:   [image, "digit 7"]                                   (a caption pair)
    images_per_doc = k:   [image, "digit 7", image, "digit 2", ...]   (an interleaved document)

Record i of the train split holds digit i (and, for k > 1, digits perm_j[i] of fixed random
permutations j = 1..k-1), so every image is seen once per epoch per slot.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

WORDS = ("digit", *[str(d) for d in range(10)])  # the captions' vocabulary (WordTokenizer)
TRAIN_IMAGES = 1500


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (optional extra)
    except ImportError:
        raise ImportError(
            "data.kind='digits' needs scikit-learn: pip install -e '.[digits]'"
        ) from None
    d = load_digits()
    return np.asarray(d.images), np.asarray(d.target)


def digit_images(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 3], labels int [N]) of the "train" or "eval" split."""
    images_N88, labels_N = _load()
    part = slice(0, TRAIN_IMAGES) if split == "train" else slice(TRAIN_IMAGES, None)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    u8_N88 = np.round(images_N88[part] * (255 / 16)).astype(np.uint8)
    big_NSS = np.stack(
        [
            np.asarray(Image.fromarray(x).resize((image_size, image_size), Image.BILINEAR))
            for x in u8_N88
        ]
    )
    return np.repeat(big_NSS[..., None], 3, axis=-1), labels_N[part]


def caption(label: int) -> str:
    return f"digit {int(label)}"


class DigitsSource:
    """Random-access source (grain protocol: len + getitem) of digit documents (module doc)."""

    def __init__(self, split: str = "train", image_size: int = 32, images_per_doc: int = 1):
        if images_per_doc < 1:
            raise ValueError(f"images_per_doc={images_per_doc} must be >= 1")
        self.split, self.image_size, self.images_per_doc = split, image_size, images_per_doc
        self._images, self._labels = digit_images(split, image_size)
        n = len(self._labels)
        rng = np.random.default_rng(1234)
        self._perms = [np.arange(n)] + [rng.permutation(n) for _ in range(images_per_doc - 1)]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, list]:
        parts: list = []
        for perm in self._perms:
            j = int(perm[index])
            parts += [self._images[j], caption(self._labels[j])]
        return {"parts": parts}

    def __repr__(self) -> str:
        return (
            f"DigitsSource({self.split!r}, image_size={self.image_size}, "
            f"images_per_doc={self.images_per_doc}, {len(self)} records)"
        )
