"""Bounded memory (issue 15): what the app keeps per upload is small whatever the upload's pixel count."""
import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.dashboard import THUMBNAIL_SIZE, analyse_uploads
from models.engine import MalignancyPredictor
from models.inference import load_model_folder

BOUND_MB = 150  # growth allowed for 30 kept results of 24.5 MP canvases (the full decodes alone would be ~1.2 GB)


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _canvas_png(i: int) -> bytes:
    """A 5000x4900 one-colour PNG: a few KB on disk, 73 MB decoded (the issue's large-canvas upload)."""
    b = io.BytesIO()
    Image.new("RGB", (5000, 4900), (180 + i % 50, 90, 160)).save(b, "PNG", optimize=False, compress_level=9)
    return b.getvalue()


def test_many_large_canvas_uploads_stay_within_a_memory_bound(tiny_models_root):
    lm = load_model_folder(tiny_models_root / "100X" / "efficientnet_lite2")
    uploads = [_canvas_png(i) for i in range(30)]
    assert max(len(u) for u in uploads) < 2**20
    pred = MalignancyPredictor(lm, magnification="100X")
    analyse_uploads(pred, [("warm.png", uploads[0])])  # first forward allocates the model's working memory
    before = _rss_mb()
    kept = [analyse_uploads(pred, [(f"canvas{i}.png", u)])[0] for i, u in enumerate(uploads)]  # as the cache keeps them
    grown = _rss_mb() - before
    assert all(r.error == "" and r.p_malignant is not None for r in kept)
    assert any("reduced" in w for w in kept[0].warnings)
    thumb = Image.open(io.BytesIO(kept[0].thumbnail))
    assert thumb.width <= THUMBNAIL_SIZE[0] and thumb.height <= THUMBNAIL_SIZE[1]
    assert grown < BOUND_MB, f"memory grew {grown:.0f} MB for 30 kept uploads"
