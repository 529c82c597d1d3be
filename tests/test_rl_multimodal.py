"""Multimodal RL: image prompts (JSON lines `"image"` paths) go through the processor,
`qwen35_jax.generate` and the policy's forward pass exactly as in training.

RL on the digits task raising held-out accuracy: tests/test_rl_digits.py."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

import qwen35_jax
from tests.test_train_multimodal import model_config
from train.data.multimodal import VisualSpec, encode_document
from train.data.tokenizers import WordTokenizer
from train.rl import prompts, rewards, rollout, tasks
from train.rl.config import resolved, rl_section
from train.rl.update import sequence_logp

TOK = WordTokenizer(("digit", "cat", "dog", *"0123456789"))


def vl_config() -> qwen35_jax.Qwen35Config:
    """test_train_multimodal's tiny-vl model with eos 1 and pad 0 (generation stops and pads)."""
    cfg = model_config()
    return cfg.replace(
        text_config=dataclasses.replace(cfg.text_config, eos_token_id=1, pad_token_id=0)
    )


def test_image_prompts_are_generated_and_scored_as_in_training(tmp_path):
    """JSON lines with image paths (two sizes) and a text-only record: the prompt is the
    training document [image, prompt] (encode_document), the patches go per row to generate,
    and generate's sampling log-probs equal the update's forward pass over the same rows."""
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (32, 32, 3)), ("b.png", (16, 32, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
    lines = [
        {"prompt": "digit", "answer": "7", "image": "a.png"},
        {"prompt": "cat dog", "answer": "cat", "image": "b.png"},
        {"prompt": "digit", "answer": "3"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    records = tasks.read_jsonl(str(path), "rl.prompts_path")
    assert records[0]["image"] == str(tmp_path / "a.png")
    cfg = vl_config()
    spec = VisualSpec.of(cfg)
    enc = prompts.encode(records, TOK, 12, spec, 16)
    image = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    doc = encode_document([image, "digit"], TOK, spec, max_patches=16, add_eos=False)
    assert enc.rows[0] == doc["tokens"].tolist()
    np.testing.assert_array_equal(enc.pixel_values[0, : len(doc["pixels"])], doc["pixels"])
    assert enc.pixel_values.shape == (3, 16, spec.patch_dim)
    assert enc.image_grid_thw[:, 0].tolist() == [[1, 4, 4], [1, 2, 4], [0, 0, 0]]
    assert enc.rows[2] == TOK.encode("digit")
    with pytest.raises(ValueError, match="rl.max_prompt_len=4"):
        prompts.encode(records, TOK, 4, spec, 16)
    with pytest.raises(ValueError, match="no vision_config"):
        prompts.encode(records, TOK, 12)

    params = qwen35_jax.init_params(cfg, jax.random.key(0), runtime=qwen35_jax.Runtime())
    task = tasks.Task(records, [], seed=0)

    def sampler(rows, attempt, **visual):
        return qwen35_jax.generate(
            cfg, params, rows, max_new_tokens=3, rng=jax.random.key(attempt), temperature=1.0,
            stop_token_ids=(1,), **visual,
        )  # fmt: skip

    rl = rl_section()
    rl.update(prompts_per_step=3, group_size=2, max_prompt_len=12, max_new_tokens=3, max_patches=16)
    rl = resolved(rl)
    ro = rollout.collect(sampler, task, TOK, rewards.exact_match, rl, 0, 1, 0, spec=spec)
    assert ro.pixels_BPF.shape == (6, 16, spec.patch_dim) and ro.grids_BG3.shape == (6, 1, 3)
    got = sequence_logp(cfg, params, ro.ids_BW, ro.valid_BW, ro.pixels_BPF, ro.grids_BG3)
    mask = ro.mask_BT > 0
    np.testing.assert_allclose(np.asarray(got)[mask], ro.old_logp_BT[mask], atol=2e-5)
    # without the pixels the forward pass reads other log-probs: the images are used
    blind = sequence_logp(cfg, params, ro.ids_BW, ro.valid_BW)
    assert np.abs(np.asarray(blind)[mask] - ro.old_logp_BT[mask]).max() > 1e-3
