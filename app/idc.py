"""The IDC page's helpers: uploads (patches, or a zip of one patient's patches), results, the rebuilt region."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

MAX_PATCHES = 3000  # per upload: one patient of the collection has a few hundred to a few thousand patches
MAX_MEMBER_BYTES = 2 * 2**20
MAX_ARCHIVE_BYTES = 200 * 2**20
PATCH_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass
class Uploads:
    items: list[tuple[str, bytes]] = field(default_factory=list)  # (name, bytes) of each patch to analyse
    refused: list[str] = field(default_factory=list)  # one line per file or archive member left out, with why


def expand_uploads(files: list[tuple[str, bytes]], max_patches: int = MAX_PATCHES) -> Uploads:
    """Patches as uploaded, and zip archives opened member by member (sizes checked before reading each; folders
    and non-image members listed, never extracted to disk)."""
    up = Uploads()

    def add(name: str, data: bytes) -> None:
        if len(up.items) >= max_patches:
            up.refused.append(f"{name}: more than {max_patches} patches in this upload; upload the rest separately")
        else:
            up.items.append((name, data))

    for name, data in files:
        if not name.lower().endswith(".zip"):
            add(name, data)
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                total = 0
                for info in z.infolist():
                    base = PurePosixPath(info.filename).name
                    if info.is_dir() or base.startswith("."):
                        continue
                    where = f"{name}:{info.filename}"
                    if not base.lower().endswith(PATCH_SUFFIXES):
                        up.refused.append(f"{where}: not an image file")
                    elif info.file_size > MAX_MEMBER_BYTES:
                        up.refused.append(f"{where}: larger than {MAX_MEMBER_BYTES // 2**20} MB uncompressed")
                    elif total + info.file_size > MAX_ARCHIVE_BYTES:
                        up.refused.append(f"{where}: the archive exceeds {MAX_ARCHIVE_BYTES // 2**20} MB uncompressed")
                    else:
                        total += info.file_size
                        add(base, z.read(info))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            up.refused.append(f"{name}: not a readable zip archive ({exc})")
    return up


def results_table(results, threshold: float) -> pd.DataFrame:
    """One row per patch: name, patient and coordinates from the name, p(IDC), call, the name's stated class."""
    return pd.DataFrame([{
        "patch": r.name, "patient": r.patch.patient if r.patch else "", "x": r.patch.x if r.patch else None,
        "y": r.patch.y if r.patch else None, "p_idc": None if r.p_idc is None else round(r.p_idc, 4),
        "call": r.label, "class in name": ("" if not r.patch else "IDC-positive" if r.patch.label else "IDC-negative"),
        "warning": r.warning, "threshold": threshold} for r in results])


def region_of(table: pd.DataFrame, patient: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p(IDC) map, stated-class map, the patient's p values) rebuilt from the coordinates in the names."""
    from models.idc import region_map

    t = table[(table["patient"] == patient) & table["p_idc"].notna() & table["x"].notna()]
    xs, ys = t["x"].to_numpy(int), t["y"].to_numpy(int)
    stated = (t["class in name"] == "IDC-positive").astype(float).to_numpy()
    return region_map(xs, ys, t["p_idc"].to_numpy(float)), region_map(xs, ys, stated), t["p_idc"].to_numpy(float)
