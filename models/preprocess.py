"""Image loading with clear errors, and the one frame->tensor path that training and inference share."""
from __future__ import annotations

import io
from struct import error as struct_error
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms import InterpolationMode

from models.card import PreprocessConfig

MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 25_000_000  # a BreakHis frame is 0.32 MP; past 25 MP (a 5000x5000 camera) is refused before decoding
MAX_SIDE = 2100  # frames are reduced as they are decoded to at most 3x a BreakHis frame's 700 px a side
MIN_SIDE = 64
# Decoded formats, named explicitly (PIL would otherwise try every format it knows on any bytes).
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
               ".webp": "WEBP"}


class ImageError(ValueError):
    """An input that cannot be analysed; the message is shown to the user as is."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, 8-bit, EXIF orientation applied, landscape, at most MAX_SIDE a side
    original_mode: str
    original_size: tuple[int, int]
    warnings: list[str] = field(default_factory=list)


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None, min_side: int = MIN_SIDE) -> LoadedImage:
    """Decode any user file into 8-bit RGB, or raise ImageError with a reason a clinician can read.

    Nothing process-wide is changed (no PIL globals, no warning filters): the pixel count is checked from the header
    before anything is decoded, and large frames are reduced while decoding (JPEG draft) or right after (reduce),
    so the memory a frame costs is bounded whatever its size.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "upload")
    notes: list[str] = []
    try:
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.exists():
                raise ImageError(f"{label}: file not found")
            if not p.is_file():  # a directory, FIFO or device: never opened (a FIFO would block)
                raise ImageError(f"{label}: not a regular file")
            if p.stat().st_size > MAX_FILE_BYTES:
                raise ImageError(f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MB")
            try:
                data = p.read_bytes()
            except PermissionError:
                raise ImageError(f"{label}: permission denied") from None
        elif isinstance(source, bytes):
            data = source
        else:
            data = source.read(MAX_FILE_BYTES + 1)
        if len(data) == 0:
            raise ImageError(f"{label}: file is empty")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MB")
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{label}: {w}x{h} pixels is too large (more than {MAX_PIXELS // 10**6} MP; "
                             "decompression-bomb guard)")
        ext = Path(label).suffix.lower()
        if ext in _EXTENSIONS and _EXTENSIONS[ext] != img.format:
            notes.append(f"the file is named {ext} but holds a {img.format} image")
        factor = max(1, -(-max(w, h) // MAX_SIDE))  # ceil
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (w // factor, h // factor))  # decode at 1/2, 1/4 or 1/8 scale
        img.load()
        factor = max(1, -(-max(img.size) // MAX_SIDE))
        if factor > 1:
            img = img.reduce(factor)
        if img.size != (w, h):
            notes.append(f"{w}x{h} frame reduced to {img.width}x{img.height} for analysis")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: image is too large (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (accepted formats: {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, struct_error, EOFError) as exc:
        raise ImageError(f"{label}: image is corrupt or truncated ({exc})") from None
    loaded = to_rgb(img, label, size=(w, h), min_side=min_side)
    loaded.warnings[:0] = notes
    return loaded


def to_rgb(img: Image.Image, label: str = "image", size: tuple[int, int] | None = None,
           min_side: int = MIN_SIDE) -> LoadedImage:
    """Normalise mode and orientation (a portrait frame is turned to landscape, as BreakHis frames are), recording
    what was changed as warnings. min_side: smaller images are refused (IDC patches: 8; edge patches are padded by models.idc)."""
    notes: list[str] = []
    mode, size = img.mode, size or img.size
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image
        transposed = img
    if transposed.size != img.size or transposed is not img and img.getexif().get(0x0112, 1) != 1:
        notes.append("EXIF orientation applied")
    img = transposed
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
        notes.append(f"{mode} (16-bit or float) image scaled to 8-bit")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            notes.append("transparent areas were composited on white")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    if img.mode in ("L", "1", "LA"):
        notes.append("grayscale image: H&E colour information is missing, the result is unreliable")
    if img.mode == "CMYK":
        notes.append("CMYK image converted to RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.size) < min_side:
        raise ImageError(f"{label}: image is too small ({img.width}x{img.height}; need at least {min_side} px a side)")
    if img.height > img.width:
        # The models were trained on landscape 700x460 frames; squashing a portrait frame into that shape distorts
        # the tissue (issue 15: 5 of 16 labels flipped). A quarter turn keeps every pixel's geometry.
        img = img.transpose(Image.Transpose.ROTATE_90)
        notes.append("portrait frame turned a quarter turn (counter-clockwise) to landscape, as the models were "
                     "trained; the heatmap is shown on the turned frame")
    return LoadedImage(img, mode, size, notes)


def frame_to_uint8(img: Image.Image, cfg: PreprocessConfig, notes: list[str] | None = None) -> torch.Tensor:
    """Resize the whole RGB frame to cfg.input_size (no crop), stain-normalise if the card says so; uint8 (3,H,W).

    When normalisation is impossible for a frame: with `notes` given, the frame is used as it is and the
    reason is appended to notes (shown beside the prediction); without, ImageError (training skips and lists it).
    """
    t = TF.pil_to_tensor(img.convert("RGB"))
    interp = InterpolationMode(cfg.interpolation)
    t = TF.resize(t, list(cfg.input_size), interpolation=interp, antialias=cfg.antialias)
    if cfg.stain:
        from models.stain import StainError, normalize_stain

        try:
            t = normalize_stain(t, cfg.stain)
        except StainError as exc:
            if notes is None:
                raise ImageError(str(exc)) from None
            notes.append(f"{exc}: the frame was used without stain normalisation, unlike the training frames")
    return t


def normalize_uint8(t: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 (…,3,H,W) -> float normalised with the card's mean/std (works on batches)."""
    x = t.float() / 255.0
    lo, hi = cfg.value_range
    x = x * (hi - lo) + lo
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (x - mean) / std


def frame_to_tensor(img: Image.Image, cfg: PreprocessConfig, notes: list[str] | None = None) -> torch.Tensor:
    """The exact tensor a model sees for a frame, at training evaluation and at inference alike:
    (3, H, W), or (T, 3, h, w) native-resolution tiles when the card says so."""
    if cfg.tiles:
        from models.tiles import tile_frame

        t = tile_frame(img)
        if notes is not None:
            notes.extend(t.notes)
        return normalize_uint8(t.pixels, cfg)
    return normalize_uint8(frame_to_uint8(img, cfg, notes), cfg)
