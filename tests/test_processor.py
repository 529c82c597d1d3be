"""Pixel preprocessing against transformers, and placeholder expansion.

Images: `process_images` must equal transformers' `Qwen2VLImageProcessorPil` bit for bit (same
kwargs). Videos: transformers' `Qwen3VLVideoProcessor` needs torchvision, which the test extras
do not carry; `process_videos` is checked against the image processor instead (a video's
temporal slot j of step k is frame 2k+j processed as an image) and against hand-computed sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Qwen2VLImageProcessorPil

from qwen35_jax import processor

HALF = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))  # Qwen3.5's, our default
SMALL = dict(min_pixels=32 * 32, max_pixels=128 * 128)


def rgb(h, w, seed=0, frames=None):
    shape = (h, w, 3) if frames is None else (frames, h, w, 3)
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def reference(images, **kwargs):
    out = Qwen2VLImageProcessorPil(**kwargs)(images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(patch_size=16, merge_size=2, temporal_patch_size=2, **SMALL, **HALF),
        dict(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 30,
            image_mean=(0.48, 0.46, 0.41),
            image_std=(0.27, 0.26, 0.28),
        ),
        dict(
            patch_size=8,
            merge_size=1,
            temporal_patch_size=1,
            min_pixels=8 * 8,
            max_pixels=64 * 64,
            image_mean=(0.1, 0.2, 0.3),
            image_std=(0.9, 0.8, 0.7),
        ),
        dict(
            patch_size=4,
            merge_size=3,
            temporal_patch_size=3,
            min_pixels=12 * 12,
            max_pixels=60 * 60,
            **HALF,
        ),
    ],
    ids=["qwen35-small-bounds", "qwen2vl-clip-norm", "no-merge", "merge3-temporal3"],
)
def test_images_equal_transformers(kwargs):
    # up-scaled, unchanged, down-scaled, very wide, tiny, odd sizes; one batch of several
    images = [
        rgb(17, 23, 1),
        rgb(64, 96, 2),
        rgb(300, 200, 3),
        rgb(40, 330, 4),
        rgb(5, 9, 5),
        rgb(129, 131, 6),
    ]
    ours = processor.process_images(images, **kwargs)
    ref_px, ref_grid = reference(images, **kwargs)
    np.testing.assert_array_equal(ours["image_grid_thw"], ref_grid)
    assert ours["pixel_values"].dtype == np.float32 and ours["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(ours["pixel_values"], ref_px)


def test_defaults_are_qwen35s():
    """Our defaults = transformers' processor configured as the released Qwen3.5 checkpoints."""
    images = [rgb(50, 70, 7), rgb(200, 120, 8)]
    ours = processor.process_images(images)
    ref_px, ref_grid = reference(
        images,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=65_536,
        max_pixels=16_777_216,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    np.testing.assert_array_equal(ours["image_grid_thw"], ref_grid)
    np.testing.assert_array_equal(ours["pixel_values"], ref_px)
    assert ours["pixel_values"].shape[1] == 3 * 2 * 16 * 16


def test_video_of_one_repeated_frame_equals_the_image():
    frame = rgb(64, 96, 9)
    video = processor.process_videos([np.stack([frame, frame])], **SMALL)
    image = processor.process_images([frame], **SMALL)
    np.testing.assert_array_equal(video["video_grid_thw"], image["image_grid_thw"])
    np.testing.assert_array_equal(video["pixel_values_videos"], image["pixel_values"])


def test_video_temporal_slots_are_frames():
    """Odd frame count: the last frame repeats; slot j of step k is frame 2k+j."""
    frames = rgb(48, 80, 10, frames=5)
    out = processor.process_videos(frames, **SMALL)
    ((t, h, w),) = out["video_grid_thw"].tolist()
    assert (t, h, w) == (3, 4, 4)  # 48 x 80 rounds to 64 x 64
    px = out["pixel_values_videos"].reshape(t, h * w, 3, 2, 16, 16)
    padded = list(frames) + [frames[-1]]
    for k in range(t):
        for j in range(2):
            img = processor.process_images([padded[2 * k + j]], **SMALL)["pixel_values"]
            np.testing.assert_array_equal(px[k, :, :, j], img.reshape(h * w, 3, 2, 16, 16)[:, :, 0])


def test_video_sizes():
    # the pixel budget counts every frame: 4 x 96 x 96 > 16384 -> scaled down to 64 x 64
    out = processor.process_videos(
        rgb(100, 100, 11, frames=4), min_pixels=4096, max_pixels=4 * 64 * 64
    )
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    # frames smaller than the factor are scaled up first (20 x 40 -> 32 x 64)
    assert processor.smart_resize_video(2, 20, 40, 32, 2, 4096, 25_165_824) == (32, 64)
    # several videos of different shapes concatenate in order
    out = processor.process_videos([rgb(64, 64, 12, frames=2), rgb(32, 96, 13, frames=4)], **SMALL)
    assert out["video_grid_thw"].tolist() == [[1, 4, 4], [2, 2, 6]]
    assert out["pixel_values_videos"].shape == (16 + 2 * 2 * 6, 1536)
    with pytest.raises(ValueError, match="at least temporal_patch_size"):
        processor.process_videos(rgb(64, 64, 14, frames=1))
    with pytest.raises(TypeError, match="unknown preprocessing options"):
        processor.process_images([rgb(8, 8)], patch=3)
    with pytest.raises(ValueError, match="uint8"):
        processor.process_images([np.zeros((8, 8, 3), np.float32)])


IDS = dict(image_token_id=90, video_token_id=91, vision_start_token_id=88, vision_end_token_id=89)


def test_expand_placeholders():
    grids = np.array([[1, 4, 6], [1, 2, 2]])
    prompt = [1, 88, 90, 89, 2, 88, 90, 89, 3]
    out = processor.expand_placeholders(prompt, image_grid_thw=grids, **IDS)
    assert out == [1, 88] + [90] * 6 + [89, 2, 88, 90, 89, 3]
    # a video: per frame (timestamp tokens), start, h*w/4 placeholders, end; the wrapping
    # start/end of the one placeholder are replaced
    video = np.array([[2, 4, 4]])
    out = processor.expand_placeholders(
        [5, 88, 91, 89, 6], video_grid_thw=video, frame_prefix=lambda v, f: [70 + f], **IDS
    )
    assert out == [5, 70, 88, 91, 91, 91, 91, 89, 71, 88, 91, 91, 91, 91, 89, 6]
    bare = processor.expand_placeholders([91], video_grid_thw=video, **IDS)
    assert bare == [88, 91, 91, 91, 91, 89] * 2
    with pytest.raises(ValueError, match="2 image placeholders but 1 image grids"):
        processor.expand_placeholders(prompt, image_grid_thw=grids[:1], **IDS)
