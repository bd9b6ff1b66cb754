"""The Slides page's helpers: where slides come from (upload or a configured server folder, path-checked), the
properties table, the tile table, the top tiles, and saving a slide's summary to the case history like a case."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pandas as pd

from models.slide import SLIDE_SUFFIXES, SlideInfo

MAX_SERVER_SLIDES = 500


def slide_folder() -> Path | None:
    """The server's slide folder (BREAKHIS_SLIDES_DIR), where a lab keeps slides too large to upload; None if unset."""
    d = os.environ.get("BREAKHIS_SLIDES_DIR")
    return Path(d).resolve() if d and Path(d).is_dir() else None


def list_server_slides(folder: Path) -> list[str]:
    """Slide files under the folder (relative names, sorted, at most MAX_SERVER_SLIDES), none leading outside it."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file() and _inside(folder, p):
            out.append(str(p.relative_to(folder)))
            if len(out) >= MAX_SERVER_SLIDES:
                break
    return out


def server_slide_path(folder: Path, name: str) -> Path:
    """The chosen slide's path, refused (ValueError, one line) when it resolves outside the folder."""
    p = (folder / name)
    if not _inside(folder, p) or not p.is_file():
        raise ValueError(f"{name}: not a slide inside the configured slide folder")
    return p.resolve()


def _inside(folder: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def store_upload(name: str, data: bytes, tmpdir: str | None = None) -> Path:
    """An uploaded slide written to a private temporary folder (OpenSlide reads files, not bytes); only the base
    name is kept, so a name cannot place the file elsewhere."""
    d = Path(tmpdir or tempfile.mkdtemp(prefix="breakhis_slide_"))
    path = d / (Path(name).name or "slide")
    path.write_bytes(data)
    return path


def properties_table(info: SlideInfo) -> pd.DataFrame:
    lv = ", ".join(f"{w}x{h} (÷{d:g})" for (w, h), d in zip(info.level_dimensions, info.level_downsamples))
    rows = [("vendor", info.vendor), ("size (level 0)", f"{info.width} x {info.height} px"),
            ("levels", f"{info.level_count}: {lv}"), ("µm/px", f"{info.mpp:g} ({info.mpp_source})"),
            ("objective", info.objective), ("file size", f"{info.size_bytes / 2**20:.1f} MB")]
    return pd.DataFrame(rows, columns=["property", "value"])


def mask_overlay(mask) -> "Image.Image":
    """The slide thumbnail with the tissue mask tinted green (what tiling will cover) and non-tissue greyed."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(mask.thumbnail.convert("RGB"), dtype=np.float32)
    out = rgb * 0.55 + 255 * 0.45  # greyed
    m = mask.mask
    out[m] = rgb[m] * 0.6 + np.array([40, 200, 60], np.float32) * 0.4
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def top_tiles(run, k: int = 6) -> pd.DataFrame:
    """The k tiles with the highest probability among those called or referred only as uncertain."""
    t = run.tiles[run.tiles[run.prob_column].notna()]
    return t.sort_values(run.prob_column, ascending=False).head(k)


def tile_png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def save_slide_case(store, run, label: str, note: str = "", user: str = "", k: int = 6) -> int:
    """The slide as a case in the history: its tiles judged together by the model's case policy (models.case), the
    slide summary in the note, and the top k tiles stored as the case's frames (thumbnail, decision, reason)."""
    from app.dashboard import thumbnail_png
    from app.history import save_case
    from models.case import CaseFrame, case_verdict
    from models.engine import FramePrediction
    from models.slide import open_slide, read_tile, TileSpec, target_scale

    lm = run.predictor.model
    prob = run.prob_column
    frames = [CaseFrame(f"x{int(r.x)}_y{int(r.y)}", run.summary["magnification"], lm.model_id,
                        None if pd.isna(getattr(r, prob)) else float(getattr(r, prob)), r.decision, r.reason,
                        kind=r.decision_kind) for r in run.tiles.itertuples(index=False)]
    verdict = case_verdict(frames, lm.card.threshold, policy=lm.case_policy)
    share, ci = next((v for k2, v in run.summary.items() if k2.startswith("share_") and k2.endswith("_of_called")),
                     None), run.summary.get("share_ci95")
    t = run.summary["tiles"]
    summary = (f"Slide {Path(run.info.path).name}: {t['scored']} tiles scored, {t['called']} called, {t['referred']} "
               f"referred" + (f"; share called positive {share:.0%} (95% CI {ci[0]:.0%}-{ci[1]:.0%}, over tiles)"
                              if share is not None else ""))
    slide, info = open_slide(run.info.path, run.info.mpp if run.info.mpp_source != "slide metadata" else None)
    try:
        _, size = target_scale(run.summary["task"], run.summary["magnification"])
        results, data = [], []
        for r in top_tiles(run, k).itertuples(index=False):
            img = read_tile(slide, info, TileSpec(int(r.x), int(r.y), int(r.width), int(r.height), 1.0), size)
            png = tile_png(img)
            results.append(FramePrediction(
                name=f"{Path(info.path).name}:x{int(r.x)}_y{int(r.y)}", task=run.summary["task"], model_id=lm.model_id,
                card_sha256=lm.card_sha256, probability=float(getattr(r, prob)), label=str(r.label),
                decision=str(r.decision), reason=str(r.reason), decision_kind=str(r.decision_kind),
                warnings=(str(r.warning),) if str(r.warning) not in ("", "nan") else (), thumbnail=thumbnail_png(img)))
            data.append(png)
    finally:
        slide.close()
    prov = {"weights_sha256": lm.card.weights_sha256, "card_sha256": lm.card_sha256, "tta": False}
    return save_case(store, label, run.summary["magnification"] or "IDC", verdict, results, data, prov,
                     note="\n".join(x for x in (note, summary) if x), user=user,
                     full_frames=data)  # each tile as read (the model's input), for History's zoomable viewer
