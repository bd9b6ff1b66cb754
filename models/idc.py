"""IDC patches (the public 50x50 invasive-ductal-carcinoma collection): names, coordinates, region maps.

Patch names are `<patient>_idx5_x<X>_y<Y>_class<0|1>.png`: X and Y are the patch's top-left pixel in the patient's
whole-mount slide region, so a patient's patches can be put back where they came from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PATCH = 50
PATCH_MIN_SIDE = 8  # smaller uploads are refused as too small to judge (the collection has 50x14 edge patches)
_NAME = re.compile(r"^(?P<patient>[A-Za-z0-9]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.png$")


@dataclass(frozen=True)
class PatchName:
    patient: str
    x: int
    y: int
    label: int | None  # 1 = IDC-positive, as the collection's name states; None where the name carries none


def parse_patch_name(name: str) -> PatchName | None:
    """The patient, coordinates and stated class of an IDC patch name, or None for any other name."""
    m = _NAME.match(Path(name).name)
    if m is None:
        return None
    return PatchName(m["patient"], int(m["x"]), int(m["y"]), int(m["cls"]))


def region_map(xs: np.ndarray, ys: np.ndarray, values: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """A (H, W) map at one cell per patch of the values placed at their patches' coordinates; NaN where no patch."""
    gx, gy = np.asarray(xs) // patch, np.asarray(ys) // patch
    gx, gy = gx - gx.min(), gy - gy.min()
    out = np.full((int(gy.max()) + 1, int(gx.max()) + 1), np.nan)
    out[gy, gx] = values
    return out


def pad_patch(img, notes: list[str] | None = None):
    """An edge patch (cut short by the slide's border, e.g. 50x14) padded with white to 50x50, at its top-left as
    it lay in the slide, rather than stretched (which would distort every nucleus); training and inference alike."""
    from PIL import Image

    w, h = img.size
    if w >= PATCH and h >= PATCH:
        return img
    out = Image.new("RGB", (max(w, PATCH), max(h, PATCH)), (255, 255, 255))
    out.paste(img, (0, 0))
    if notes is not None:
        notes.append(f"{w}x{h} edge patch padded with white to {out.width}x{out.height}")
    return out


def burden_with_ci(p: np.ndarray, threshold: float, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """A patient's IDC burden (share of patches called positive) with a 95% bootstrap CI over its patches.

    The patches of one region are not independent (neighbours look alike), so this CI is a lower bound on the
    uncertainty; it says how much the share rests on few patches, not how a second biopsy would come out."""
    calls = (np.asarray(p, float) >= threshold).astype(float)
    if len(calls) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = calls[rng.integers(0, len(calls), (n_boot, len(calls)))].mean(1)
    return float(calls.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))
