"""Vision tower, early fusion and 3-D positions: float32 parity with transformers'
Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration, plus properties that the
reference cannot show (packing, padded patch budgets, traced grids, per-frame attention).

The HF models are tiny and perturbed (every weight), written with save_pretrained and read by
our load_hf, so the `model.visual.*` converter is under test too. Logits compare as
max|diff| / max|ref| <= 1e-4 on valid positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

import qwen35_jax as q
from qwen35_jax.fusion import check_placeholder_counts
from qwen35_jax.positions import rope_deltas, rope_index
from qwen35_jax.vision import patch_layout
from tests import hf_oracle

TOL = 1e-4
IMG, VID, START, END = 90, 91, 88, 89  # token ids inside the 96-token vocabulary
VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    in_channels=3,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,
)
F = 3 * 2 * 4 * 4  # pixel features per patch


def build_vl(moe: bool, seed: int = 0):
    """A perturbed tiny HF multimodal model (float32, eval mode)."""
    torch.manual_seed(seed)
    text = {
        **hf_oracle.BASE,
        **(hf_oracle.MOE if moe else {}),
        "tie_word_embeddings": moe,
        "num_hidden_layers": 4,
    }
    cls_cfg, cls = (
        (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
        if moe
        else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    )
    config = cls_cfg(
        text_config=text,
        vision_config=VISION,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=START,
        vision_end_token_id=END,
        tie_word_embeddings=moe,
    )
    model = cls(config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval().float()


_BUILT: dict[bool, tuple] = {}


def _pair(moe: bool, tmp_path_factory):
    if moe not in _BUILT:
        model = build_vl(moe)
        path = hf_oracle.save(model, tmp_path_factory.mktemp("vl"))
        _BUILT[moe] = (model, *q.load_hf(path))
    return _BUILT[moe]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The dense model: (HF model, our config, our params)."""
    return _pair(False, tmp_path_factory)


@pytest.fixture(scope="module")
def jit_forward():
    return jax.jit(q.forward, static_argnums=0)


def image_run(grid, m=2):
    return [START] + [IMG] * (int(np.prod(grid)) // m**2) + [END]


def video_run(grid, m=2):
    t, h, w = grid
    return sum(([7, START] + [VID] * (h * w // m**2) + [END] for _ in range(t)), [])


def text(n, seed):
    return list(np.random.RandomState(seed).randint(0, 80, n))


def hf_logits(model, ids, mask, pv=None, igrid=None, pvv=None, vgrid=None):
    ids_t = torch.tensor(ids)
    kw = dict(
        mm_token_type_ids=(ids_t == IMG).int() + 2 * (ids_t == VID).int(),
        attention_mask=torch.tensor(mask),
    )
    for name, x in (
        ("pixel_values", pv),
        ("image_grid_thw", igrid),
        ("pixel_values_videos", pvv),
        ("video_grid_thw", vgrid),
    ):
        if x is not None:
            kw[name] = torch.tensor(x)
    with torch.no_grad():
        return model(ids_t, **kw).logits.numpy()


def pixels(grids, seed):
    n = sum(int(np.prod(g)) for g in grids)
    return np.random.RandomState(seed).randn(n, F).astype(np.float32)


def pad_rows(rows, length=None, batch=None):
    t = length or max(len(r) for r in rows)
    ids = np.zeros((batch or len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def pad_budget(px, grids, patches, rows):
    """A fixed patch budget: zero patches after the real ones, zero rows after the grids."""
    out_px = np.zeros((patches, F), np.float32)
    out_grid = np.zeros((rows, 3), np.int64)
    if grids is not None:
        out_px[: len(px)] = px
        out_grid[: len(grids)] = grids
    return out_px, out_grid


# name: (rows of token ids, image grids, video grids); grids in patches (t, h, w)
G1, G2, G3, GV = (1, 4, 6), (1, 8, 4), (1, 2, 2), (2, 4, 4)
CASES = {
    "text+image": ([text(5, 0) + image_run(G1) + text(6, 1)], [G1], []),
    "two-images-different-sizes": (
        [text(3, 2) + image_run(G1) + text(4, 3) + image_run(G2) + text(2, 4)],
        [G1, G2],
        [],
    ),
    "video": ([text(4, 5) + video_run(GV) + text(5, 6)], [], [GV]),
    "two-images-and-a-video": (
        [text(2, 7) + image_run(G2) + video_run(GV) + text(3, 8) + image_run(G3) + text(2, 9)],
        [G2, G3],
        [GV],
    ),
    "batch-of-two": (
        [
            text(3, 10) + image_run(G1) + text(9, 11),
            text(2, 12) + video_run(GV) + image_run(G3) + text(2, 13),
        ],
        [G1, G3],
        [GV],
    ),
    "text-only": ([text(20, 14), text(13, 15)], [], []),
}
# one static shape for every case: one compiled function per model, the grids traced values
SHAPE = dict(batch=2, length=40, image_patches=64, image_rows=3, video_patches=32, video_rows=2)


def case_inputs(case):
    rows, igrids, vgrids = CASES[case]
    pv = pixels(igrids, 1) if igrids else None
    pvv = pixels(vgrids, 2) if vgrids else None
    ig = np.asarray(igrids, np.int64) if igrids else None
    vg = np.asarray(vgrids, np.int64) if vgrids else None
    return rows, pv, ig, pvv, vg


@pytest.fixture(scope="module")
def fixed_shape_forward():
    def fwd(config, params, ids, mask, pv, ig, pvv, vg):
        return q.forward(
            config,
            params,
            ids,
            attention_mask=mask,
            pixel_values=pv,
            image_grid_thw=ig,
            pixel_values_videos=pvv,
            video_grid_thw=vg,
        )

    return jax.jit(fwd, static_argnums=0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, moe, tmp_path_factory, fixed_shape_forward):
    """Each case padded to one static shape (token rows, patch budgets, grid rows), the way a
    training step sees it; the reference gets the exact inputs."""
    model, config, params = _pair(moe, tmp_path_factory)
    rows, pv, ig, pvv, vg = case_inputs(case)
    ids, mask = pad_rows(rows)
    ref = hf_logits(model, ids, mask, pv, ig, pvv, vg)
    s = SHAPE
    fixed_ids, fixed_mask = pad_rows(rows, s["length"], s["batch"])
    fixed_pv, fixed_ig = pad_budget(pv, ig, s["image_patches"], s["image_rows"])
    fixed_pvv, fixed_vg = pad_budget(pvv, vg, s["video_patches"], s["video_rows"])
    ours = fixed_shape_forward(
        config, params, fixed_ids, fixed_mask, fixed_pv, fixed_ig, fixed_pvv, fixed_vg
    )
    ours = np.asarray(ours)[: len(rows), : ids.shape[1]]
    valid = mask.astype(bool)
    assert hf_oracle.rel_err(ours[valid], ref[valid]) <= TOL


@pytest.mark.parametrize("case", ["two-images-and-a-video", "text-only"])
def test_public_api_with_exact_inputs(case, pair, jit_forward):
    """`forward` on the exact arrays (no padding of the patch budget; text-only skips the
    tower) equals the reference too."""
    model, config, params = pair
    rows, pv, ig, pvv, vg = case_inputs(case)
    ids, mask = pad_rows(rows)
    ref = hf_logits(model, ids, mask, pv, ig, pvv, vg)
    ours = jit_forward(
        config,
        params,
        ids,
        attention_mask=mask,
        pixel_values=pv,
        image_grid_thw=ig,
        pixel_values_videos=pvv,
        video_grid_thw=vg,
    )
    valid = mask.astype(bool)
    assert hf_oracle.rel_err(np.asarray(ours)[valid], ref[valid]) <= TOL
    if case == "text-only":  # the tower is not run: NaN tower weights change nothing
        nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params["visual"])
        again = jit_forward(config, {**params, "visual": nan}, ids, attention_mask=mask)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))


def test_rope_index_matches_reference(pair):
    model, config, _ = pair
    rows = [
        text(2, 0) + image_run(G2) + video_run(GV) + text(3, 1) + image_run(G1),
        text(1, 2) + image_run(G3) + text(4, 3),
    ]
    ids, mask = pad_rows(rows)
    ids_t = torch.tensor(ids)
    ref, ref_deltas = model.model.get_rope_index(
        ids_t,
        (ids_t == IMG).int() + 2 * (ids_t == VID).int(),
        image_grid_thw=torch.tensor([G2, G1, G3]),
        video_grid_thw=torch.tensor([GV]),
        attention_mask=torch.tensor(mask),
    )
    ours = rope_index(config, ids, np.array([G2, G1, G3]), np.array([GV]), attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    deltas = rope_deltas(ours, mask.astype(bool))
    np.testing.assert_array_equal(np.asarray(deltas), ref_deltas.numpy()[:, 0])
    # left padding: HF counts only unmasked tokens, so do we
    left_ids = np.concatenate([np.zeros((1, 4), np.int64), ids[1:, : len(rows[1])]], axis=1)
    left_mask = (np.arange(left_ids.shape[1]) >= 4).astype(np.int64)[None]
    left = rope_index(config, left_ids, np.array([G3]), attention_mask=left_mask)
    np.testing.assert_array_equal(
        np.asarray(left)[:, 0, 4:], np.asarray(ours)[:, 1, : len(rows[1])]
    )


def test_packed_documents_keep_their_positions(pair, jit_forward):
    """Two multimodal documents packed in one row = each document alone (logits, positions)."""
    _, config, params = pair
    doc_a = text(3, 20) + image_run(G1) + text(4, 21)
    doc_b = text(2, 22) + video_run(GV) + image_run(G3) + text(3, 23)
    pa, pv_vid, pb = pixels([G1], 3), pixels([GV], 4), pixels([G3], 5)
    n = len(doc_a) + len(doc_b)
    # row 0: both documents packed; rows 1, 2: each alone (same shapes: one compile)
    ids, seg = pad_rows([doc_a + doc_b, doc_a, doc_b], length=n)
    seg[0, len(doc_a) : n] = 2
    out = jit_forward(
        config,
        params,
        np.concatenate([ids, ids[1:]]),  # images in row order: a, b, a, b
        segment_ids=np.concatenate([seg, seg[1:]]),
        pixel_values=np.concatenate([pa, pb, pa, pb]),
        image_grid_thw=np.array([G1, G3, G1, G3]),
        pixel_values_videos=np.concatenate([pv_vid, pv_vid]),
        video_grid_thw=np.array([GV, GV]),
    )
    out = np.asarray(out)
    np.testing.assert_allclose(out[0, : len(doc_a)], out[1, : len(doc_a)], atol=2e-5)
    np.testing.assert_allclose(out[0, len(doc_a) : n], out[2, : len(doc_b)], atol=2e-5)
    pos = rope_index(config, ids, np.array([G1, G3, G1, G3]), np.array([GV, GV]), segment_ids=seg)
    pos = np.asarray(pos)
    np.testing.assert_array_equal(pos[:, 0, : len(doc_a)], pos[:, 1, : len(doc_a)])
    np.testing.assert_array_equal(pos[:, 0, len(doc_a) : n], pos[:, 2, : len(doc_b)])


def test_vision_attention_stays_within_each_frame(pair):
    """Changing one image's pixels (or one video frame's) leaves the other tokens untouched."""
    _, config, params = pair
    from qwen35_jax.vision import VisionTower, vision_rope_theta

    grid = np.array([G1, G3, (2, 4, 4)])
    sizes = [int(np.prod(g)) for g in grid]
    pv = pixels(grid, 7)
    tower = VisionTower(config.vision_config, vision_rope_theta(config))
    layout = patch_layout(grid, pv.shape[0], 2)

    def run(x):
        return np.asarray(tower.apply({"params": params["visual"]}, x, layout))

    base = run(pv)
    changed = pv.copy()
    changed[: sizes[0]] += 1.0  # the first image
    start_frame2 = sizes[0] + sizes[1] + 16  # the second temporal step of the video
    changed[start_frame2:] += 1.0
    out = run(changed)
    m_img, m_small = sizes[0] // 4, sizes[1] // 4
    assert np.abs(out[:m_img] - base[:m_img]).max() > 1e-3
    np.testing.assert_allclose(
        out[m_img : m_img + m_small + 4], base[m_img : m_img + m_small + 4], atol=1e-6
    )
    assert np.abs(out[m_img + m_small + 4 :] - base[m_img + m_small + 4 :]).max() > 1e-3


def test_placeholder_count_mismatch_is_an_error(pair):
    _, config, params = pair
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        q.forward(
            config,
            params,
            np.array([image_run(G1)[:-3]]),
            pixel_values=pixels([G1], 0),
            image_grid_thw=np.array([G1]),
        )
    # a padded budget (zero grid rows) counts only its real grids
    ids = np.array([image_run(G1) + video_run(GV)])
    check_placeholder_counts(config, ids, np.array([G1, (0, 0, 0)]), np.array([GV, (0, 0, 0)]))
    with pytest.raises(ValueError, match="video features and video tokens do not match"):
        check_placeholder_counts(config, ids, None, np.array([GV, GV]))


def test_pixels_to_logits_end_to_end(tmp_path):
    """Real-sized patches (16 px, 48 x 48 position table): uint8 images and a video through our
    processor and placeholder expansion, then our forward vs the reference on the same arrays."""
    torch.manual_seed(1)
    vision = dict(VISION, hidden_size=64, num_heads=4, patch_size=16, num_position_embeddings=2304)
    hf_config = Qwen3_5Config(
        text_config={**hf_oracle.BASE, "num_hidden_layers": 4},
        vision_config=vision,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    model = Qwen3_5ForConditionalGeneration(hf_config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    config, params = q.load_hf(hf_oracle.save(model, tmp_path))
    rng = np.random.RandomState(0)
    images = [
        rng.randint(0, 256, (70, 130, 3), np.uint8),
        rng.randint(0, 256, (200, 90, 3), np.uint8),
    ]
    video = rng.randint(0, 256, (5, 64, 96, 3), np.uint8)
    kw = dict(min_pixels=32 * 32, max_pixels=256 * 256)
    img, vid = q.process_images(images, **kw), q.process_videos([video], **kw)
    prompt = [1, 2, START, IMG, END, 3, START, VID, END, 5, START, IMG, END, 6]
    ids = q.expand_placeholders(
        prompt,
        image_grid_thw=img["image_grid_thw"],
        video_grid_thw=vid["video_grid_thw"],
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=START,
        vision_end_token_id=END,
        frame_prefix=lambda v, f: [7],
    )
    ids = np.array([ids])
    arrays = (img["pixel_values"], img["image_grid_thw"])
    arrays += (vid["pixel_values_videos"], vid["video_grid_thw"])
    ref = hf_logits(model, ids, np.ones_like(ids), *arrays)
    pv, ig, pvv, vg = arrays
    ours = jax.jit(q.forward, static_argnums=0)(
        config,
        params,
        ids,
        pixel_values=pv,
        image_grid_thw=ig,
        pixel_values_videos=pvv,
        video_grid_thw=vg,
    )
    assert hf_oracle.rel_err(np.asarray(ours), ref) <= TOL


def test_per_row_patch_budgets(pair, jit_forward):
    """The per-row form (pixels [B, P_row, F], grids [B, G_row, 3], each row padded on its own,
    as a training batch splits along B) gives the reference logits and the same positions."""
    model, config, params = pair
    rows, pv, ig, pvv, vg = case_inputs("batch-of-two")  # row 0: G1; row 1: GV then G3
    ids, mask = pad_rows(rows)
    ref = hf_logits(model, ids, mask, pv, ig, pvv, vg)
    n1 = int(np.prod(G1))
    row_pv = np.zeros((2, 32, F), np.float32)
    row_pv[0, :n1], row_pv[1, : int(np.prod(G3))] = pv[:n1], pv[n1:]
    row_ig = np.array([[G1, (0, 0, 0)], [G3, (0, 0, 0)]])
    row_pvv = np.zeros((2, 32, F), np.float32)
    row_pvv[1] = pvv
    row_vg = np.array([[(0, 0, 0)], [GV]])
    ours = jit_forward(
        config,
        params,
        ids,
        attention_mask=mask,
        pixel_values=row_pv,
        image_grid_thw=row_ig,
        pixel_values_videos=row_pvv,
        video_grid_thw=row_vg,
    )
    valid = mask.astype(bool)
    assert hf_oracle.rel_err(np.asarray(ours)[valid], ref[valid]) <= TOL
    flat = rope_index(config, ids, ig, vg, attention_mask=mask)
    per_row = rope_index(config, ids, row_ig, row_vg, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(per_row), np.asarray(flat))


def test_vision_name_rules_round_trip():
    """Every `model.visual.*` rule: HF tensor -> ours -> HF is the identity, and the rules fill
    exactly the `visual` subtree of the parameters (shapes included)."""
    from flax import linen as nn

    from qwen35_jax.convert.vision_names import vision_rules

    config = q.get_config("tiny-vl")
    shapes = nn.meta.unbox(q.abstract_params(config))["visual"]
    filled = set()
    rng = np.random.RandomState(0)
    for rule in vision_rules(config.vision_config):
        tensor = rng.randn(*rule.shape).astype(np.float32)
        parts = []
        for piece, part in zip(rule.pieces, rule.split(tensor), strict=True):
            leaf = shapes
            for name in piece.path[1:]:
                leaf = leaf[name]
            ours = piece.to_ours(part)
            assert ours.shape == leaf.shape[len(piece.index) :], rule.key
            filled.add((piece.path, piece.index))
            parts.append(piece.to_hf(ours))
        np.testing.assert_array_equal(rule.join(parts), tensor)
    depth = config.vision_config.depth
    n_leaves = sum(
        depth if "blocks" in jax.tree_util.keystr(k) else 1
        for k, _ in jax.tree_util.tree_leaves_with_path(shapes)
    )
    assert len(filled) == n_leaves
