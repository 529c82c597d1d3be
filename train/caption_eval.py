"""Held-out captioning accuracy: does the trained model name the digit in an image it never saw?

For each of the first `count` held-out digits (data/digits.py, split "eval"), the prompt is the
start of a training document, without its label:

    vision_start, n image placeholders, vision_end, "digit"      (+ the image's patches)

and the model's greedy next token (one forward pass over all prompts as one batch, pixels in the
per-row form; `sampling.greedy_complete`) is correct when it decodes to the label. Ten classes,
balanced: chance is 10%.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import qwen35_jax
from train.data import digits
from train.data.multimodal import VisualSpec, encode_document
from train.data.tokenizers import Tokenizer
from train.sampling import greedy_complete

CHANCE = 0.1


def caption_prompts(
    images: np.ndarray, tokenizer: Tokenizer, spec: VisualSpec, *, max_patches: int
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """(prompt ids, pixel_values [N, P_row, F], image_grid_thw [N, 1, 3]) for "<image> digit"."""
    docs = [
        encode_document([img, "digit"], tokenizer, spec, max_patches=max_patches, add_eos=False)
        for img in images
    ]
    p_row = max(len(d["pixels"]) for d in docs)
    pixels_NPF = np.zeros((len(docs), p_row, spec.patch_dim), np.float32)
    grids_N13 = np.zeros((len(docs), 1, 3), np.int32)
    for i, d in enumerate(docs):
        pixels_NPF[i, : len(d["pixels"])] = d["pixels"]
        grids_N13[i] = d["grids"]
    return [d["tokens"].tolist() for d in docs], pixels_NPF, grids_N13


def digits_eval(
    model_cfg: qwen35_jax.Qwen35Config,
    params: Any,
    tokenizer: Tokenizer,
    *,
    image_size: int,
    count: int,
    max_patches: int,
    runtime: qwen35_jax.Runtime | None = None,
) -> dict[str, Any]:
    """{"correct", "total", "accuracy", "chance", "predictions"} on `count` held-out digits."""
    images, labels = digits.digit_images("eval", image_size)
    images, labels = images[:count], labels[:count]
    spec = VisualSpec.of(model_cfg)
    prompts, pixels, grids = caption_prompts(images, tokenizer, spec, max_patches=max_patches)
    outs = greedy_complete(
        model_cfg,
        params,
        prompts,
        1,
        pixel_values=pixels,
        image_grid_thw=grids,
        runtime=runtime,
    )
    predictions = [tokenizer.decode(o) for o in outs]
    correct = sum(p == str(int(y)) for p, y in zip(predictions, labels, strict=True))
    return {
        "correct": int(correct),
        "total": len(labels),
        "accuracy": correct / max(len(labels), 1),
        "chance": CHANCE,
        "predictions": predictions,
    }


def describe(result: dict[str, Any]) -> str:
    """The one-line report, e.g. 'digits eval: 87/200 correct (43.5%), chance 10%'."""
    return (
        f"digits eval: {result['correct']}/{result['total']} correct "
        f"({100 * result['accuracy']:.1f}%), chance {100 * result['chance']:.0f}%"
    )
