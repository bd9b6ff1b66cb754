"""Native-resolution tiles: the grid, the tile model's predict path, its attention and the stitched heatmap."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.tiles import REFERENCE_SIZE, TILE_SIZE, tile_frame
from tests.conftest import FRAMES, make_model_folder


def test_breakhis_frames_become_a_2x3_grid_at_native_scale():
    t = tile_frame(Image.new("RGB", REFERENCE_SIZE, (200, 100, 150)))
    assert t.pixels.shape == (6, 3, *TILE_SIZE) and t.pixels.dtype == torch.uint8 and not t.notes
    covered = np.zeros(REFERENCE_SIZE[::-1], bool)
    for top, left, h, w in t.boxes:
        covered[top:top + h, left:left + w] = True
    assert covered.mean() > 0.99  # the grid covers the frame (at most a 1-px seam)
    # the downscaled BreakHis copies (500x328) go back to the 700x460 grid, silently
    small = tile_frame(Image.new("RGB", (500, 328)))
    assert small.frame.size == REFERENCE_SIZE and small.pixels.shape[0] == 6 and not small.notes
    # any other size: tiled at its own pixels, with a warning that the scale is unknown
    odd = tile_frame(Image.new("RGB", (1000, 800)))
    assert odd.pixels.shape[0] == 12 and "scale is unknown" in odd.notes[0]


def test_tile_detail_is_native_not_resized():
    """A tile holds the frame's own pixels: a 1-px checkerboard survives tiling (it would blur if shrunk)."""
    arr = ((np.indices(REFERENCE_SIZE[::-1]).sum(0) % 2) * 255).astype(np.uint8)
    t = tile_frame(Image.fromarray(np.stack([arr] * 3, -1)))
    assert set(np.unique(t.pixels[0].numpy())) == {0, 255}


@pytest.fixture(scope="module")
def tile_model(tmp_path_factory):
    from models.archs import file_sha256
    from models.card import ModelCard
    from models.inference import load_model_folder
    from safetensors.torch import save_file

    d = make_model_folder(tmp_path_factory.mktemp("m") / "all" / "tiles_mil", "tiles", "all", seed=3)
    c = ModelCard.from_json(d / "card.json")
    c.arch_config = {"backbone": "efficientnet_lite2", "pooling": "attention"}
    c.preprocess.tiles = {"grid": [2, 3], "tile_size": list(TILE_SIZE), "reference_size": list(REFERENCE_SIZE)}
    c.to_json(d / "card.json")
    lm = load_model_folder(d)
    with torch.no_grad():  # a scratch attention head attends almost evenly; sharpen it so weights differ
        lm.model.head.w.weight.mul_(200.0)
    return lm


def _frame():
    paths = sorted(FRAMES.glob("*/*.png"))
    if paths:
        return Image.open(paths[0]).convert("RGB")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (460, 700, 3), dtype=np.uint8))


def test_tile_model_predicts_frames_of_any_size_and_reports_the_scale(tile_model):
    frame = _frame()
    notes = [[], []]
    p = tile_model.predict_images([frame, frame.resize((1000, 800))], notes=notes)
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    assert not notes[0] and "scale is unknown" in notes[1][0]
    # the same frame as a 500x328 downscaled copy is tiled on the same grid: a close, not arbitrary, answer
    assert abs(tile_model.predict_images([frame.resize((500, 328))])[0] - p[0]) < 0.2


def test_tile_attention_sums_to_one_and_the_stitched_heatmap_covers_the_frame(tile_model):
    from models.gradcam import gradcam_heatmap, tile_attention, tile_attention_overlay

    frame = _frame()
    boxes, weights, size = tile_attention(tile_model, frame)
    assert len(boxes) == len(weights) == 6 and weights.sum() == pytest.approx(1.0, abs=1e-5)
    heat = gradcam_heatmap(tile_model, frame, "Grad-CAM", 1)
    assert heat.shape == (frame.height, frame.width) and 0 <= heat.min() and heat.max() <= 1
    # each tile's map is scaled by its attention relative to the most attended tile
    rel = weights / weights.max()
    assert rel.min() < 0.8, "the fixture must attend unevenly for this check to mean anything"
    for (top, left, h, w), r in zip(boxes, rel):
        assert heat[top + 2:top + h - 2, left + 2:left + w - 2].max() <= r + 0.02
    over = tile_attention_overlay(frame, boxes, weights, size)
    assert over.size == frame.size


def test_scale_shift_cv_shows_what_scale_augmentation_buys():
    """Synthetic embeddings whose signal sits in another dimension at other scales: the head trained at scale 1
    only is at chance there, the scale-augmented head is not; both are scored on the same patient-grouped folds."""
    import pandas as pd

    from training.frozen_cv import scale_shift_cv

    rng = np.random.default_rng(0)
    n_pat, per = 16, 4
    pats = np.repeat([f"p{i}" for i in range(n_pat)], per)
    y = np.repeat(np.arange(n_pat) % 2, per)
    df = pd.DataFrame({"patient": pats, "label": np.where(y == 1, "malignant", "benign"), "magnification": "100X"})
    scales = (0.8, 1.0, 1.25)
    means = rng.normal(0, 1, (3, len(df), 4)).astype(np.float32)
    means[1, :, 0] += 2.5 * y  # at scale 1 the signal is in dimension 0 ...
    means[0, :, 1] += 2.5 * y  # ... at the other scales in dimension 1
    means[2, :, 1] += 2.5 * y
    res = scale_shift_cv(df, means, scales, split_seeds=(0,), k=4, n_boot=50)
    at1, at125 = res["by_test_scale"]["1.0"], res["by_test_scale"]["1.25"]
    assert at1["plain"]["value"] > 0.9
    assert at125["plain"]["value"] < 0.75 < at125["scale_aug"]["value"]
    assert at125["scale_aug_minus_plain"]["difference"] > 0
