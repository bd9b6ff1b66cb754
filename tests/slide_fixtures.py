"""Pyramidal TIFF slides written with tifffile for the slide tests (OpenSlide reads them as generic tiled TIFF)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

TILE = 256


def write_pyramid(path: Path, level0: np.ndarray, mpp: float | None, levels: int = 3) -> Path:
    """level0 (H, W, 3) uint8 and `levels - 1` halvings (2x2 means), tiled and zlib-compressed (lossless); µm/px in
    the resolution tags, or none (a slide that does not state its scale)."""
    import tifffile

    img = level0
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for lvl in range(levels):
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * 2 ** lvl),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(img, tile=(TILE, TILE), photometric="rgb", compression="zlib", subfiletype=1 if lvl else 0, **kw)
            h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
            img = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
    return path


def write_sparse_gigapixel(path: Path, side: int = 100_000, mpp: float = 0.25, tissue: np.ndarray | None = None,
                           levels: int = 6) -> Path:
    """A side x side RGB pyramid (10 gigapixels at 100,000) whose tiles are empty (written sparsely: no bytes) except a
    block of `tissue` at the top-left of every level, halved per level."""
    import tifffile

    def tiles(h: int, w: int, block: np.ndarray) -> Iterator[np.ndarray | None]:
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                if y < block.shape[0] and x < block.shape[1]:
                    t = np.full((TILE, TILE, 3), 255, np.uint8)
                    part = block[y:y + TILE, x:x + TILE]
                    t[:part.shape[0], :part.shape[1]] = part
                    yield t
                else:
                    yield None

    block = tissue if tissue is not None else np.zeros((0, 0, 3), np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lvl in range(levels):
            h, w = side >> lvl, side >> lvl
            tw.write(tiles(h, w, block), shape=(h, w, 3), dtype="uint8", tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", subfiletype=1 if lvl else 0,
                     resolution=(1e4 / (mpp * 2 ** lvl),) * 2, resolutionunit="CENTIMETER")
            if block.size:
                bh, bw = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
                block = block[:bh, :bw].reshape(bh // 2, 2, bw // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
    return path
