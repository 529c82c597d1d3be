"""Pixel preprocessing for the vision tower, and placeholder expansion in tokenized prompts.

Images (equal to transformers' `Qwen2VLImageProcessorPil`, which Qwen3.5 uses, for the same
kwargs), per H x W x 3 uint8 image:
  1. `smart_resize`: (h, w) -> multiples of factor = patch_size * merge_size, rounded, then scaled
     (keeping the aspect ratio) into [min_pixels, max_pixels]; Pillow bicubic resize of the uint8
     image (always applied, as transformers does).
  2. x = (u8 * (1/255) [float64 -> float32] - mean) / std       float32, per channel
  3. patchify: C x H x W -> grid (1, h, w) with h = H/ps, w = W/ps; patches in merge-block order
     (blocks of m x m patches in raster order, raster order inside a block); each patch flattened
     as (C, temporal_patch_size, ps, ps), the one image repeated along the temporal axis.
  Output: pixel_values [sum of h*w, C*Tp*ps*ps] float32 and image_grid_thw [n, 3] int64.

Videos (frames T x H x W x 3 uint8; the frames given are used, no frame sampling): as
transformers' `Qwen3VLVideoProcessor` (used by Qwen3.5) with Pillow in place of torchvision for
the resize. The size comes from the video `smart_resize`, which budgets pixels over all frames
(t_bar * h * w within [min_pixels, max_pixels], t_bar = frames rounded to temporal_patch_size,
images smaller than the factor first scaled up); every frame is resized to that size; frames
are padded to a multiple of temporal_patch_size by repeating the last one; grid
(T / Tp, h, w); each patch flattened as (C, Tp, ps, ps) over Tp consecutive frames.

Defaults are those of the released Qwen3.5 preprocessor configs (patch 16, temporal patch 2,
merge 2, mean = std = 0.5; images 65,536..16,777,216 pixels, videos 4,096..25,165,824).

`expand_placeholders` turns a tokenized prompt with one placeholder token per image / video into
the model's input ids: one image placeholder -> h*w/m^2 copies; one video placeholder -> per
frame (optional timestamp tokens) + vision_start + h*w/m^2 copies + vision_end, as the Qwen3.5
processor writes frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

IMAGE_DEFAULTS = dict(
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=65_536,
    max_pixels=16_777_216,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
)
VIDEO_DEFAULTS = dict(IMAGE_DEFAULTS, min_pixels=4_096, max_pixels=25_165_824)


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Image target size: multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} must be below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    factor: int,
    temporal_factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """Video frame target size: the pixel budget counts all (rounded) frames."""
    if num_frames < temporal_factor:
        raise ValueError(
            f"a video needs at least temporal_patch_size={temporal_factor} frames, got {num_frames}"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} must be below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _check_uint8_rgb(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 arrays [..., H, W, 3], got {x.dtype} {x.shape}")
    return x


def _resize(image_HW3: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image_HW3).resize((width, height), Image.Resampling.BICUBIC))


def _normalize(u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float32: (x / 255 - mean) / std."""
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = np.moveaxis(x, -1, -3)
    mean32 = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, np.float32).reshape(3, 1, 1)
    return (x - mean32) / std32


def _patchify(
    frames_TCHW: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of Tp) -> patches [t*h*w, C*Tp*ps*ps] in merge-block order."""
    n, c, hh, ww = frames_TCHW.shape
    ps, tp, m = patch_size, temporal_patch_size, merge_size
    t, h, w = n // tp, hh // ps, ww // ps
    x = frames_TCHW.reshape(t, tp, c, h // m, m, ps, w // m, m, ps)
    # -> t, h-block, w-block, row-in-block, col-in-block, C, Tp, ps, ps
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * tp * ps * ps), (t, h, w)


def process_images(images: Sequence[np.ndarray] | np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    """{"pixel_values": [P, F] float32, "image_grid_thw": [n, 3] int64} for H x W x 3 uint8 images.

    kwargs (defaults: `IMAGE_DEFAULTS`): patch_size, temporal_patch_size, merge_size, min_pixels,
    max_pixels, image_mean, image_std.
    """
    o = _options(IMAGE_DEFAULTS, kwargs)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    factor = o["patch_size"] * o["merge_size"]
    patches, grids = [], []
    for image in images:
        image = _check_uint8_rgb(image, "images")
        if image.ndim != 3:
            raise ValueError(f"each image must be [H, W, 3], got {image.shape}")
        h, w = smart_resize(
            image.shape[0], image.shape[1], factor, o["min_pixels"], o["max_pixels"]
        )
        x_CHW = _normalize(_resize(image, h, w), o["image_mean"], o["image_std"])
        frames = np.broadcast_to(x_CHW[None], (o["temporal_patch_size"], *x_CHW.shape))
        p, grid = _patchify(frames, o["patch_size"], o["temporal_patch_size"], o["merge_size"])
        patches.append(p)
        grids.append(grid)
    return {
        "pixel_values": np.concatenate(patches, axis=0),
        "image_grid_thw": np.asarray(grids, np.int64).reshape(-1, 3),
    }


def process_videos(videos: Sequence[np.ndarray] | np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    """{"pixel_values_videos": [P, F] float32, "video_grid_thw": [n, 3] int64} for videos given
    as T x H x W x 3 uint8 frame arrays (or lists of H x W x 3 frames). Same kwargs as
    `process_images` (defaults: `VIDEO_DEFAULTS`)."""
    o = _options(VIDEO_DEFAULTS, kwargs)
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    factor, tp = o["patch_size"] * o["merge_size"], o["temporal_patch_size"]
    patches, grids = [], []
    for video in videos:
        video = _check_uint8_rgb(
            np.stack(list(video)) if not isinstance(video, np.ndarray) else video, "videos"
        )
        if video.ndim != 4:
            raise ValueError(f"each video must be [T, H, W, 3], got {video.shape}")
        n = video.shape[0]
        h, w = smart_resize_video(
            n, video.shape[1], video.shape[2], factor, tp, o["min_pixels"], o["max_pixels"]
        )
        frames = np.stack([_resize(f, h, w) for f in video])
        if pad := -n % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        x_TCHW = _normalize(frames, o["image_mean"], o["image_std"])
        p, grid = _patchify(x_TCHW, o["patch_size"], tp, o["merge_size"])
        patches.append(p)
        grids.append(grid)
    return {
        "pixel_values_videos": np.concatenate(patches, axis=0),
        "video_grid_thw": np.asarray(grids, np.int64).reshape(-1, 3),
    }


def _options(defaults: dict, kwargs: dict) -> dict:
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(
            f"unknown preprocessing options {sorted(unknown)}; valid: {sorted(defaults)}"
        )
    return {**defaults, **kwargs}


def expand_placeholders(
    input_ids: Sequence[int],
    *,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    merge_size: int = 2,
    frame_prefix: Callable[[int, int], Sequence[int]] | None = None,
) -> list[int]:
    """Expand one placeholder per image / video into the right number of tokens.

    Images: each `image_token_id` becomes t*h*w / merge^2 copies (its grid, in order).
    Videos: each `video_token_id`, with the vision_start / vision_end around it when present,
    becomes for every temporal step f: `frame_prefix(video_index, f)` (e.g. the tokenized
    "<1.0 seconds>" timestamp; nothing by default), vision_start, h*w/merge^2 copies, vision_end.
    Raises if the number of placeholders differs from the number of grids.
    """
    ids = [int(x) for x in input_ids]
    images = [] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3).tolist()
    videos = [] if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3).tolist()
    for token, grids, what in (
        (image_token_id, images, "image"),
        (video_token_id, videos, "video"),
    ):
        if ids.count(token) != len(grids):
            raise ValueError(
                f"the prompt has {ids.count(token)} {what} placeholders but "
                f"{len(grids)} {what} grids were given"
            )
    out: list[int] = []
    image_i = video_i = 0
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok == image_token_id:
            t, h, w = images[image_i]
            out += [image_token_id] * (t * h * w // merge_size**2)
            image_i += 1
        elif tok == video_token_id:
            t, h, w = videos[video_i]
            wrapped = out[-1:] == [vision_start_token_id] and ids[i + 1 : i + 2] == [
                vision_end_token_id
            ]
            if wrapped:
                out.pop()
                i += 1
            for f in range(t):
                out += list(frame_prefix(video_i, f)) if frame_prefix else []
                out += [
                    vision_start_token_id,
                    *[video_token_id] * (h * w // merge_size**2),
                    vision_end_token_id,
                ]
            video_i += 1
        else:
            out.append(tok)
        i += 1
    return out
