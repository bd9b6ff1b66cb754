"""Score a whole slide's tiles with the engine's Predictor and write what a pathologist opens: a tile CSV (level-0
coordinates), a GeoJSON FeatureCollection QuPath imports, a heatmap PNG with its colour scale, and a JSON summary
with provenance. Used by `python -m models slide` and by the Slides page."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from models.engine import Item, Predictor
from models.slide import (MAX_UPSAMPLE, SlideInfo, TissueMask, check_reachable, iter_tiles, open_slide,
                          slide_fingerprint, target_scale, tile_grid, tissue_mask)

SCALE_NOTE = ("tile scale from the model's training frames: BreakHis 0.49/0.20/0.098/0.049 µm/px at 40X/100X/200X/400X "
              "and IDC 4 µm/px are derived, approximate figures (../shared/data/README.md)")


@dataclass
class SlideRun:
    info: SlideInfo
    mask: TissueMask
    tiles: pd.DataFrame  # one row per tile: x, y, width, height (level 0), tissue_fraction, probability, decision...
    summary: dict
    predictor: Predictor
    prob_column: str


def score_slide(path: str | Path, predictor: Predictor, task: str, magnification: str | None = None,
                mpp: float | None = None, stride: float = 1.0, min_tissue: float = 0.25, max_tiles: int | None = None,
                progress: Callable[[int, int], None] | None = None, mask_params: dict | None = None) -> SlideRun:
    """Open, mask, tile at the model's scale and predict every tile (refused with SlideError where the slide cannot
    give that scale)."""
    slide, info = open_slide(path, mpp)
    try:
        target_mpp, size = target_scale(task, magnification)
        what = "IDC patches" if task == "idc" else magnification
        upsample = check_reachable(info, target_mpp, what)
        mask = tissue_mask(slide, info, **(mask_params or {}))
        grid = tile_grid(info, mask, target_mpp, size, stride, min_tissue)
        capped = max_tiles is not None and len(grid) > max_tiles
        grid = grid[:max_tiles] if capped else grid
        rows = []

        def items():
            for i, (t, img) in enumerate(iter_tiles(slide, info, grid, size)):
                rows.append({"x": t.x, "y": t.y, "width": t.width, "height": t.height,
                             "tissue_fraction": round(t.tissue_fraction, 4)})
                if progress is not None:
                    progress(i + 1, len(grid))
                yield Item(f"{Path(path).name}:x{t.x}_y{t.y}", img)

        results = predictor.predict(items())
    finally:
        slide.close()
    prob = "p_idc" if task == "idc" else "p_malignant"
    df = pd.DataFrame(rows)
    if len(df):
        df[prob] = [r.probability for r in results]
        df["label"] = [r.label for r in results]
        df["decision"] = [r.decision for r in results]
        df["reason"] = [r.reason for r in results]
        df["decision_kind"] = [r.decision_kind for r in results]
        df["warning"] = [r.warning for r in results]
    else:
        df = pd.DataFrame(columns=["x", "y", "width", "height", "tissue_fraction", prob, "label", "decision", "reason",
                                   "decision_kind", "warning"])
    summary = summarise(df, prob, info, mask, predictor, task, magnification, stride, min_tissue, upsample,
                        len(grid), capped)
    return SlideRun(info, mask, df, summary, predictor, prob)


def summarise(df: pd.DataFrame, prob: str, info: SlideInfo, mask: TissueMask, predictor: Predictor, task: str,
              magnification: str | None, stride: float, min_tissue: float, upsample: float, n_grid: int,
              capped: bool, n_boot: int = 2000) -> dict:
    """Tiles called and referred, the share called positive with a bootstrap CI over tiles (neighbouring tiles are
    not independent: the CI is a lower bound on the uncertainty), and provenance."""
    from models.config import software_version

    positive = "IDC-positive" if task == "idc" else "malignant"
    called = df[df["decision"].isin([positive, "IDC-negative" if task == "idc" else "benign"])] if len(df) else df
    share = ci = None
    if len(called):
        calls = (called["decision"] == positive).to_numpy(float)
        rng = np.random.default_rng(0)
        boots = calls[rng.integers(0, len(calls), (n_boot, len(calls)))].mean(1)
        share, ci = float(calls.mean()), [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    lm = predictor.model
    return {
        "slide": info.to_dict() | {"fingerprint_sha256": slide_fingerprint(info.path)},
        "task": task, "magnification": magnification,
        "tiles": {"on_tissue": int(n_grid), "scored": int(len(df)), "called": int(len(called)),
                  "referred": int((df["decision"] == "refer").sum()) if len(df) else 0,
                  "referred_by_kind": df.loc[df["decision"] == "refer", "decision_kind"].value_counts().to_dict()
                  if len(df) else {},
                  "capped_by_max_tiles": bool(capped)},
        f"share_{'idc' if task == 'idc' else 'malignant'}_of_called": share, "share_ci95": ci,
        "share_ci_note": "bootstrap over tiles; neighbouring tiles are correlated, so the CI is a lower bound",
        "model": {"model_id": lm.model_id, "card_sha256": lm.card_sha256, "weights_sha256": lm.card.weights_sha256,
                  "threshold": lm.card.threshold, "refer_policy": lm.policy is not None,
                  "refer_policy_note": lm.policy_note},
        "tiling": {"stride": stride, "min_tissue": min_tissue, "upsample_factor": round(upsample, 4),
                   "max_upsample": MAX_UPSAMPLE, "mask": mask.params | {"otsu_threshold": mask.threshold},
                   "scale_note": SCALE_NOTE},
        "software": software_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": "Research aid only, not a diagnosis.",
    }


def geojson_of(run: SlideRun):
    """A FeatureCollection of one Polygon per tile (level-0 pixel coordinates, as QuPath expects) with the tile's
    classification and measurements; written with the geojson library and checked valid."""
    import geojson

    feats = []
    for r in run.tiles.itertuples(index=False):
        x, y, w, h = int(r.x), int(r.y), int(r.width), int(r.height)
        p = getattr(r, run.prob_column)
        meas = {run.prob_column: None if p is None or p != p else float(p), "tissue_fraction": float(r.tissue_fraction)}
        feats.append(geojson.Feature(
            geometry=geojson.Polygon([[(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]]),
            properties={"objectType": "detection", "name": str(r.decision),
                        "classification": {"name": str(r.decision)},
                        "measurements": {k: v for k, v in meas.items() if v is not None},
                        "reason": str(r.reason), "isLocked": False}))
    fc = geojson.FeatureCollection(feats)
    if not fc.is_valid:
        raise ValueError(f"invalid GeoJSON: {fc.errors()}")
    return fc


def heatmap_overlay(run: SlideRun, opacity: float = 0.55, show_mask: bool = True) -> tuple[Image.Image, float]:
    """(the slide thumbnail with each tile coloured by its probability on the Grad-CAM colour scale, referred tiles
    outlined and crossed in black, the tissue mask's border in green; level-0 pixels -> image pixels factor)."""
    from models.gradcam import colour_scale

    thumb = run.mask.thumbnail.convert("RGB")
    base = np.asarray(thumb, dtype=np.float32)
    over = base.copy()
    lut = np.asarray(colour_scale(256, 1), dtype=np.float32)[0]
    s = run.info.mpp / run.mask.mpp
    boxes = []
    for r in run.tiles.itertuples(index=False):
        x0, y0 = int(r.x * s), int(r.y * s)
        x1, y1 = max(x0 + 1, int((r.x + r.width) * s)), max(y0 + 1, int((r.y + r.height) * s))
        p = getattr(r, run.prob_column)
        if p is not None and p == p:
            over[y0:y1, x0:x1] = (1 - opacity) * base[y0:y1, x0:x1] + opacity * lut[int(round(float(p) * 255))]
        boxes.append((x0, y0, x1 - 1, y1 - 1, r.decision == "refer"))
    arr = over.clip(0, 255).astype(np.uint8)
    if show_mask:
        from skimage.segmentation import find_boundaries

        arr[find_boundaries(run.mask.mask, mode="inner")] = (0, 160, 0)
    k = 1
    if arr.shape[1] < 300:  # small thumbnails are enlarged so tiles and marks stay legible
        k = -(-300 // arr.shape[1])
        arr = arr.repeat(k, 0).repeat(k, 1)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1, referred in boxes:
        if referred:
            x0, y0, x1, y1 = x0 * k, y0 * k, (x1 + 1) * k - 1, (y1 + 1) * k - 1
            d.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
            d.line((x0, y0, x1, y1), fill=(0, 0, 0))
            d.line((x0, y1, x1, y0), fill=(0, 0, 0))
    return img, s * k


def heatmap_image(run: SlideRun, opacity: float = 0.55, show_mask: bool = True) -> Image.Image:
    """heatmap_overlay with its colour scale and caption underneath (a heatmap without a scale misleads)."""
    from models.gradcam import overlay_with_scale

    img, _ = heatmap_overlay(run, opacity, show_mask)
    what = "p(IDC)" if run.prob_column == "p_idc" else "p(malignant)"
    return overlay_with_scale(img, f"{what} per tile; crossed = referred; green = tissue border")


def write_outputs(run: SlideRun, out: str | Path) -> dict[str, Path]:
    """<stem>_tiles.csv, <stem>.geojson, <stem>_heatmap.png, <stem>_summary.json in `out`."""
    from models.textsafe import csv_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(run.info.path).stem
    paths = {"tiles": out / f"{stem}_tiles.csv", "geojson": out / f"{stem}.geojson",
             "heatmap": out / f"{stem}_heatmap.png", "summary": out / f"{stem}_summary.json"}
    csv_safe(run.tiles).to_csv(paths["tiles"], index=False)
    import geojson

    paths["geojson"].write_text(geojson.dumps(geojson_of(run)))
    heatmap_image(run).save(paths["heatmap"])
    paths["summary"].write_text(json.dumps(run.summary, indent=1, default=str) + "\n")
    return paths
