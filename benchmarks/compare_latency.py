"""Compare models on one frame: the first look vs a second look at the same frame (issue 27), from one run.

The Compare page computes, per chosen model, the call (decode, QC, predict) and the Grad-CAM map, through the
pages' caches (app.ui_cache: per model, frame bytes, method, class, branch). This runs the page's own calls for every
model the page offers at a magnification (7 at 100X with the shipped models), twice on the same frame: the first
look pays model loading, prediction and Grad-CAM; the second should be served from the caches. It also times building
the zoomable viewer figure. Printed and written as seconds and their ratio.

    python benchmarks/compare_latency.py [--magnification 100X] [--frame PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
logging.getLogger("streamlit").setLevel(logging.ERROR)  # bare mode (no page running): caches work, warnings do not help


def models_at(magnification: str) -> list[str]:
    """The models the Compare page offers at a magnification (its own filter)."""
    from app.ui_cache import cached_cards
    from models.card import ALL

    cards = cached_cards()
    return [m for m, c in cards.items() if c.magnification == magnification
            or (c.magnification == ALL and magnification in c.per_magnification)
            or magnification in c.evaluation.get("cross_magnification", {})]


def one_look(models: list[str], name: str, data: bytes, magnification: str) -> tuple[float, list]:
    """The page's work for one frame: each model's call and, where it made one, its Grad-CAM overlay."""
    from app.dashboard import decode_frame
    from app.ui_cache import cached_analysis, cached_heatmap, cached_model
    from models.gradcam import cam_branches, gradcam_overlay

    t = time.perf_counter()
    panels, frame = [], None
    for mid in models:
        lm = cached_model(mid)
        r = cached_analysis(mid, name, data, magnification)
        if r.decision_kind in ("call", "band"):
            frame = frame or decode_frame(data, name)
            b = "cnn" if "cnn" in cam_branches(lm) else cam_branches(lm)[0]
            panels.append((mid, gradcam_overlay(frame, cached_heatmap(mid, name, data, "Grad-CAM", 1, b))))
    return time.perf_counter() - t, [frame, panels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--magnification", default="100X")
    ap.add_argument("--frame", default=None, help="default: the first frame of ../shared at that magnification")
    ap.add_argument("--out", default="benchmarks/results/compare_latency.json")
    a = ap.parse_args()
    from app.viewer import frame_viewer
    from models.config import shared_dir

    frame = Path(a.frame) if a.frame else sorted((shared_dir() / "data" / "breakhis" / a.magnification).glob("*"))[0]
    data = frame.read_bytes()
    models = models_at(a.magnification)
    first, (img, panels) = one_look(models, frame.name, data, a.magnification)
    second, _ = one_look(models, frame.name, data, a.magnification)
    t = time.perf_counter()
    if panels:
        frame_viewer(img, panels, columns=2).to_json()
    viewer = time.perf_counter() - t
    res = {"magnification": a.magnification, "frame": frame.name, "models": models, "n_models": len(models),
           "heatmaps": len(panels), "first_look_s": first, "second_look_s": second,
           "first_over_second": first / max(second, 1e-9), "viewer_figure_s": viewer,
           "command": "python benchmarks/compare_latency.py"}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{len(models)} models at {a.magnification} on {frame.name}: first look {first:.1f} s, second look "
          f"{second:.3f} s (ratio {res['first_over_second']:.0f}x); viewer figure with {len(panels)} overlays "
          f"{viewer:.2f} s")


if __name__ == "__main__":
    main()
