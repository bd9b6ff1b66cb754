"""Whole-slide images: open (OpenSlide), find the tissue, cut fields of view at the physical scale a model was trained
at, and score every tile with the same Predictor, QC, OOD and refer decision as an uploaded frame (models.engine).

Scales (approximate, and said wherever used): BreakHis frames are about 0.49 / 0.20 / 0.098 / 0.049 µm/px at
40X / 100X / 200X / 400X (derived from the microscope and camera in ../shared/data/README.md, assuming 700x460 sensor
crops without resizing). The IDC patches are 50x50 at about 4 µm/px: cut from 40x scans (about 0.25 µm/px) reduced
16:1 to an apparent 2.5x, as Janowczyk & Madabhushi (2016) describe their IDC use case. A slide states its own µm/px
(`openslide.mpp-x`); a slide without it is refused unless the user states it.

Never is level 0 read whole: the tissue mask comes from a low-resolution level (or a thumbnail OpenSlide builds from
the nearest level), and each tile is read as one region at the level nearest its scale and resampled. A reader thread
fills a bounded queue while the network scores the previous batch, so memory does not grow with the slide.
"""
from __future__ import annotations

import hashlib
import math
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

MAG_MPP = {"40X": 0.49, "100X": 0.20, "200X": 0.098, "400X": 0.049}  # µm/px of BreakHis frames (approximate)
IDC_MPP = 4.0  # µm/px of the IDC patches (approximate: 40x scans reduced 16:1)
FRAME_SIZE = (700, 460)  # (width, height) of a BreakHis frame
IDC_SIZE = (50, 50)
MAX_UPSAMPLE = 1.25  # a tile may be enlarged at most this much from the slide's finest level; beyond: refused
MASK_MPP = (2.0, 16.0)  # the tissue mask's resolution (µm per mask pixel): ~1024 px on the long side, within these
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".svslide", ".bif", ".vms", ".vmu")


class SlideError(ValueError):
    """A slide that cannot be analysed as asked; the message is one line and says what to do."""


@dataclass
class SlideInfo:
    path: str
    vendor: str
    width: int
    height: int
    level_count: int
    level_dimensions: list
    level_downsamples: list
    mpp: float  # µm per level-0 pixel (x; y is checked to agree)
    mpp_source: str  # "slide metadata" | "stated by the user"
    objective: str
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (H, W) at `mpp` µm per pixel
    mpp: float
    thumbnail: Image.Image  # RGB at the same resolution
    threshold: float  # Otsu threshold on saturation (0-1), after the floor
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TileSpec:
    """Where a field of view lies (level-0 pixels), and how it is read (level, region size) and resized."""

    x: int
    y: int
    width: int  # level-0 pixels
    height: int
    tissue_fraction: float


def open_slide(path: str | Path, mpp: float | None = None):
    """(OpenSlide handle, SlideInfo); SlideError with one line for a missing, unsupported or corrupt file, or a slide
    without µm/px when none is stated."""
    import openslide

    p = Path(path)
    if not p.exists():
        raise SlideError(f"{p}: file not found")
    if not p.is_file():
        raise SlideError(f"{p}: not a regular file")
    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{p}: not a whole-slide format OpenSlide reads (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)") \
            from None
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"{p}: corrupt or truncated slide ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})") \
            from None
    props = slide.properties
    stated = props.get("openslide.mpp-x")
    try:
        own = float(stated) if stated else None
    except ValueError:
        own = None
    if mpp is not None:
        if not (0.01 <= mpp <= 100):
            raise SlideError(f"{p}: --mpp {mpp} is not a plausible µm/px (0.01-100)")
        use, source = float(mpp), "stated by the user" + (f" (the slide says {own})" if own else "")
    elif own and own > 0:
        use, source = own, "slide metadata"
    else:
        slide.close()
        raise SlideError(f"{p}: the slide states no µm/px (openslide.mpp-x); state it with --mpp (e.g. 0.25 for a "
                         "40x scan, 0.5 for 20x) or in the field on the page")
    try:  # a truncated file can open and fail on its first read
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except Exception as exc:
        slide.close()
        raise SlideError(f"{p}: corrupt or truncated slide ({type(exc).__name__})") from None
    info = SlideInfo(str(p), props.get("openslide.vendor", "unknown"), *slide.dimensions, slide.level_count,
                     [list(d) for d in slide.level_dimensions], [float(d) for d in slide.level_downsamples], use,
                     source, props.get("openslide.objective-power", "unknown"), p.stat().st_size)
    return slide, info


def target_scale(task: str, magnification: str | None) -> tuple[float, tuple[int, int]]:
    """(µm/px, (width, height) in pixels) of the field of view a model expects."""
    if task == "idc":
        return IDC_MPP, IDC_SIZE
    if magnification not in MAG_MPP:
        raise SlideError(f"magnification must be one of {sorted(MAG_MPP)}")
    return MAG_MPP[magnification], FRAME_SIZE


def check_reachable(info: SlideInfo, target_mpp: float, what: str) -> float:
    """The upsampling factor a tile needs; SlideError when it exceeds MAX_UPSAMPLE (the scan is too coarse)."""
    factor = info.mpp / target_mpp
    if factor > MAX_UPSAMPLE:
        raise SlideError(f"{Path(info.path).name}: {what} needs {target_mpp:g} µm/px but the slide is scanned at "
                         f"{info.mpp:g} µm/px: each tile would be enlarged {factor:.1f}x (more than {MAX_UPSAMPLE}x), "
                         "which invents detail the scan does not have")
    return factor


def tissue_mask(slide, info: SlideInfo, mask_mpp: float | None = None, min_saturation: float = 0.07,
                min_object_um2: float = 5000.0, close_um: float = 32.0) -> TissueMask:
    """Tissue where the low-resolution thumbnail's saturation exceeds an Otsu threshold (floored at min_saturation:
    a blank slide has no threshold to find), cleaned by a morphological closing and by removing objects smaller
    than min_object_um2 (sizes in µm, so the mask means the same at every scan resolution), as WSInfer and
    TIAToolbox do."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import binary_closing, disk, remove_small_objects

    if mask_mpp is None:
        mask_mpp = float(np.clip(max(info.width, info.height) * info.mpp / 1024, *MASK_MPP))
    w, h = max(1, round(info.width * info.mpp / mask_mpp)), max(1, round(info.height * info.mpp / mask_mpp))
    thumb = slide.get_thumbnail((w, h)).convert("RGB")  # from the nearest level, never level 0 whole
    if thumb.size != (w, h):
        thumb = thumb.resize((w, h), Image.BILINEAR)
    sat = rgb2hsv(np.asarray(thumb))[..., 1]
    try:
        thr = float(threshold_otsu(sat)) if sat.max() > sat.min() else 1.0
    except ValueError:
        thr = 1.0
    thr = max(thr, min_saturation)
    mask = sat > thr
    r = max(1, round(close_um / mask_mpp / 2))
    mask = binary_closing(mask, disk(r))
    mask = remove_small_objects(mask, max_size=max(0, round(min_object_um2 / mask_mpp ** 2) - 1))
    return TissueMask(mask, mask_mpp, thumb, thr, {"mask_mpp": mask_mpp, "min_saturation": min_saturation,
                                                    "min_object_um2": min_object_um2, "close_um": close_um})


def tile_grid(info: SlideInfo, mask: TissueMask, target_mpp: float, size: tuple[int, int], stride: float = 1.0,
              min_tissue: float = 0.25) -> list[TileSpec]:
    """Fields of view of `size` pixels at `target_mpp` on a grid over the tissue (stride as a fraction of the tile:
    1 = edge to edge, 0.5 = half overlap), in level-0 pixels; a tile is kept when at least min_tissue of it is
    tissue in the mask."""
    tw, th = (round(s * target_mpp / info.mpp) for s in size)
    sx, sy = max(1, round(tw * stride)), max(1, round(th * stride))
    scale = info.mpp / mask.mpp  # level-0 pixel -> mask pixel
    integral = np.pad(mask.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tiles = []
    for y in range(0, max(1, info.height - th + 1), sy):
        for x in range(0, max(1, info.width - tw + 1), sx):
            x0, y0 = int(x * scale), int(y * scale)
            x1 = min(mask.mask.shape[1], max(x0 + 1, int(math.ceil((x + tw) * scale))))
            y1 = min(mask.mask.shape[0], max(y0 + 1, int(math.ceil((y + th) * scale))))
            area = (x1 - x0) * (y1 - y0)
            frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / max(area, 1)
            if frac >= min_tissue:
                tiles.append(TileSpec(x, y, tw, th, float(frac)))
    return tiles


def read_plan(info: SlideInfo, t: TileSpec, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(level, region size in that level's pixels) for a tile: the coarsest level whose pixels are still at least as
    fine as the tile needs (OpenSlide's best level for the downsample), so the region is resampled down, never up
    beyond the finest level."""
    downsample = max(t.width / size[0], 1.0)  # level-0 pixels per output pixel
    level = max((i for i, d in enumerate(info.level_downsamples) if d <= downsample * (1 + 1e-6)), default=0)
    ds = info.level_downsamples[level]
    return level, (max(1, round(t.width / ds)), max(1, round(t.height / ds)))


def read_tile(slide, info: SlideInfo, t: TileSpec, size: tuple[int, int], level_offset: int = 0) -> Image.Image:
    """One field of view: one region read at the level nearest its scale (read_plan), resampled to the model's size.
    Transparent (outside the scanned area) pixels become white, as on glass. level_offset exists for the test that
    shows a level off by one is caught."""
    level, region_size = read_plan(info, t, size)
    if level_offset:
        level = min(max(level + level_offset, 0), info.level_count - 1)
        ds = info.level_downsamples[level]
        region_size = (max(1, round(t.width / ds)), max(1, round(t.height / ds)))
    region = slide.read_region((t.x, t.y), level, region_size)
    bg = Image.new("RGBA", region.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(bg, region).convert("RGB")
    return rgb if rgb.size == size else rgb.resize(size, Image.LANCZOS)


def iter_tiles(slide, info: SlideInfo, tiles: list[TileSpec], size: tuple[int, int], prefetch: int = 8
               ) -> Iterator[tuple[TileSpec, Image.Image]]:
    """The tiles in order, read by a background thread into a bounded queue (reading overlaps inference; at most
    `prefetch` tiles wait in memory)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def reader() -> None:
        try:
            for t in tiles:
                if stop.is_set():
                    return
                q.put((t, read_tile(slide, info, t, size)))
        except Exception as exc:  # surfaced in the consumer, one line
            q.put(exc)
        finally:
            q.put(done)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        while True:
            got = q.get()
            if got is done:
                return
            if isinstance(got, Exception):
                raise SlideError(f"{Path(info.path).name}: reading a tile failed ({type(got).__name__}: "
                                 f"{str(got).splitlines()[0] if str(got) else ''})")
            yield got
    finally:
        stop.set()
        while th.is_alive():  # unblock the reader if it waits on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)


def slide_fingerprint(path: str | Path, chunk: int = 2**20) -> str:
    """sha256 of the file's size and its first and last MiB: a slide of gigabytes is identified without reading it
    whole (OpenSlide's own quickhash is only defined for some formats)."""
    p = Path(path)
    n = p.stat().st_size
    h = hashlib.sha256(str(n).encode())
    with open(p, "rb") as f:
        h.update(f.read(chunk))
        if n > chunk:
            f.seek(max(chunk, n - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()
