"""Held-out captioning accuracy: does the trained model name the digit in an image it never saw?

For each of the first `count` held-out digits (data/digits.py, split "eval"), the prompt is the
start of a training document, without its label:

    vision_start, n image placeholders, vision_end, "digit"      (+ the image's patches)

and the model's greedy next token (one forward pass over all prompts as one batch, pixels in the
per-row form; `sampling.greedy_complete`) is correct when it decodes to the label. Ten classes,
balanced: chance is 10%. This runs once, at the end of a digits run (`data.eval_examples`).

During training, held-out evaluation of multimodal data (evaluation.py, every
`train.eval_every` steps) measures captions teacher-forced, in the same pass as `eval_loss`
(`caption_sums_fn`): over the fixed evaluation batches (packed documents, text targets only),

    eval_loss      = sum CE(text targets) / #text targets
    eval_accuracy  = #documents whose every text target (caption words and eos) is the argmax of
                     the model given the document's images and the tokens before it
                     / #documents with a text target

A document counts as correct exactly when greedy decoding after each of its images would
reproduce the text that follows (by induction over the tokens: each greedy step sees the same
context as the teacher-forced one), so for a caption pair it is the generation check above,
made of one forward pass; for digits ("digit 7" + eos) it also needs the word and the eos.
The argmax is taken over the full vocabulary, `train.loss_chunk` positions at a time (all of
T when 0) like the training loss, so the [B, T, V] logits need not exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax
from train import losses
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


def head_pass(
    hidden_BTD: jax.Array,
    head_DV: jax.Array,
    targets_BT: jax.Array,
    valid_BT: jax.Array,
    *,
    chunk: int,
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(CE sum, target count, hit_BT: argmax == target) of `hidden @ head`, `chunk` positions at
    a time (0: all T at once); the head's operands in `dtype`, float32 accumulation (the
    model's own head)."""
    b, t, d = hidden_BTD.shape
    chunk = chunk or t
    n = -(-t // chunk)
    pad = ((0, 0), (0, n * chunk - t))
    hidden_NBCD = jnp.pad(hidden_BTD, (*pad, (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_NBC = jnp.pad(targets_BT, pad).reshape(b, n, chunk).swapaxes(0, 1)
    valid_NBC = jnp.pad(valid_BT, pad).reshape(b, n, chunk).swapaxes(0, 1)
    head_DV = head_DV.astype(dtype)

    def one(xs):
        h_BCD, tgt_BC, val_BC = xs
        logits_BCV = jnp.einsum(
            "bcd,dv->bcv", h_BCD.astype(dtype), head_DV, preferred_element_type=jnp.float32
        )
        ce, _, count = losses.cross_entropy_sums(logits_BCV, tgt_BC, val_BC)
        return ce, count, jnp.argmax(logits_BCV, axis=-1) == tgt_BC

    ce_N, count_N, hit_NBC = jax.lax.map(one, (hidden_NBCD, targets_NBC, valid_NBC))
    hit_BT = hit_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return jnp.sum(ce_N), jnp.sum(count_N), hit_BT


def document_matches(
    hit_BT: jax.Array, valid_BT: jax.Array, segment_ids_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(documents with a target, documents whose every target is hit), float32: a document is a
    segment of a row (segment id > 0; packing never splits one over rows)."""
    b, t = segment_ids_BT.shape
    rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    seg_BT = jnp.where(valid_BT, segment_ids_BT, 0)  # padding and non-targets: segment 0
    targets_BS = (
        jnp.zeros((b, t + 1), jnp.int32).at[rows_BT, seg_BT].add(valid_BT.astype(jnp.int32))
    )
    missed_BS = (
        jnp.zeros((b, t + 1), jnp.int32)
        .at[rows_BT, seg_BT]
        .add((valid_BT & ~hit_BT).astype(jnp.int32))
    )
    has_BS = targets_BS[:, 1:] > 0
    exact_BS = has_BS & (missed_BS[:, 1:] == 0)
    return jnp.sum(has_BS, dtype=jnp.float32), jnp.sum(exact_BS, dtype=jnp.float32)


def caption_sums_fn(
    model_cfg: qwen35_jax.Qwen35Config, runtime: qwen35_jax.Runtime, loss_chunk: int = 0
) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """(params, multimodal batch) -> [CE sum, targets, MTP CE sum, MTP targets, documents,
    exact documents] (float32 [6]) of one held-out batch (module docstring): one forward pass,
    text targets only (`loss_mask`), no gradient."""
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0

    def sums(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        tokens_BT, seg_BT, mask_BT = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
        out = qwen35_jax.apply(
            model_cfg,
            params,
            tokens_BT,
            segment_ids=seg_BT,
            return_logits=False,
            return_mtp=with_mtp,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            runtime=runtime,
        )
        head_DV = qwen35_jax.lm_head_weights(model_cfg, params)
        head = dict(chunk=loss_chunk, dtype=runtime.dtype)
        targets_BT, valid_BT = losses.shifted_targets(tokens_BT, seg_BT, 1, mask_BT)
        ce, n, hit_BT = head_pass(out.hidden, head_DV, targets_BT, valid_BT, **head)
        docs, exact = document_matches(hit_BT, valid_BT, seg_BT)
        mtp = n_mtp = jnp.zeros((), jnp.float32)
        if with_mtp:
            targets2_BT, valid2_BT = losses.shifted_targets(tokens_BT, seg_BT, 2, mask_BT)
            mtp, n_mtp, _ = head_pass(out.mtp_hidden, head_DV, targets2_BT, valid2_BT, **head)
        return jnp.stack([ce, n, mtp, n_mtp, docs, exact]).astype(jnp.float32)

    return sums
