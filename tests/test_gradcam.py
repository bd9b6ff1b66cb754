import threading

import numpy as np
import pytest
from PIL import Image

from models.gradcam import CAM_METHODS, gradcam_heatmap, gradcam_overlay, target_layer
from models.inference import load_model_folder
from tests.conftest import make_model_folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model_folder(make_model_folder(tmp_path_factory.mktemp("m") / "all" / "resnet50", "resnet50", "all"))


def _frames(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (460, 700, 3), np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("method", list(CAM_METHODS))
def test_every_method_gives_a_frame_sized_map(lm, method):
    img = _frames(1)[0]
    heat = gradcam_heatmap(lm, img, method, 1)
    assert heat.shape == (460, 700) and heat.min() >= 0 and heat.max() <= 1
    over = gradcam_overlay(img, heat, 0.5)
    assert over.size == img.size


def test_concurrent_heatmaps_match_sequential(lm):
    frames = _frames(8)
    # an untrained net's map for one class can be all zero after the ReLU; explain the class that is not
    cls = max((0, 1), key=lambda c: gradcam_heatmap(lm, frames[0], "Grad-CAM", c).max())
    sequential = [gradcam_heatmap(lm, f, "Grad-CAM", cls) for f in frames]
    assert sequential[0].max() > 0
    out = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        out[i] = gradcam_heatmap(lm, frames[i], "Grad-CAM", cls)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(sequential, out):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # different images really give different maps (so a mix-up between threads would show)
    assert any(not np.allclose(sequential[0], s, atol=1e-3) for s in sequential[1:])


def test_heatmaps_stay_right_while_predictions_run_on_the_same_model(lm):
    """A prediction in another session runs through the hooked layer; without the shared lock Grad-CAM would take
    that prediction's activations (issue 15: 16 of 16 maps wrong)."""
    frames = _frames(6)
    cls = max((0, 1), key=lambda c: gradcam_heatmap(lm, frames[0], "Grad-CAM", c).max())
    sequential = [gradcam_heatmap(lm, f, "Grad-CAM", cls) for f in frames[:4]]
    others = [Image.fromarray(np.full((460, 700, 3), v, np.uint8)) for v in (0, 255)] + frames[4:]
    out = [None] * 4
    stop = threading.Event()
    barrier = threading.Barrier(8)

    def explain(i):
        barrier.wait()
        out[i] = gradcam_heatmap(lm, frames[i], "Grad-CAM", cls)

    def predict(i):
        barrier.wait()
        while not stop.is_set():
            lm.predict_images([others[i]])

    preds = [threading.Thread(target=predict, args=(i,)) for i in range(4)]
    cams = [threading.Thread(target=explain, args=(i,)) for i in range(4)]
    for t in preds + cams:
        t.start()
    for t in cams:
        t.join()
    stop.set()
    for t in preds:
        t.join()
    for a, b in zip(sequential, out):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_hooks_are_released(lm):
    layer = target_layer(lm)
    small = Image.fromarray(np.random.default_rng(1).integers(0, 255, (115, 175, 3), np.uint8))
    for i in range(24):  # every method x class three times: a leaked hook shows after the first call that leaks it
        gradcam_heatmap(lm, small, list(CAM_METHODS)[i % 4], (i // 4) % 2)
        assert len(layer._forward_hooks) == 0 and len(layer._backward_hooks) == 0
    assert all(len(m._forward_hooks) == 0 for m in lm.model.modules())


def test_colour_scale_runs_from_low_to_high_in_the_overlay_colormap():
    from models.gradcam import colour_scale, overlay_with_scale

    bar = np.asarray(colour_scale(200, 10)).astype(int)
    lo, hi = bar[5, 2], bar[5, -3]
    assert lo[2] > lo[0] and hi[0] > hi[2]  # blue at the low end, red at the high end, as in the overlays
    img = _frames(1)[0]
    heat = np.tile(np.linspace(0, 1, 700, dtype=np.float32), (460, 1))
    over = np.asarray(gradcam_overlay(img, heat, 1.0)).astype(int)  # the heatmap alone: it is the scale itself
    np.testing.assert_allclose(over[10], np.asarray(colour_scale(700, 4))[2].astype(int), atol=2)
    assert overlay_with_scale(Image.fromarray(over.astype(np.uint8)), "Grad-CAM").size == (700, 460 + 48)
