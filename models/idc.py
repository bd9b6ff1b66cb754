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
