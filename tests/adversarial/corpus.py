"""The adversarial corpus (issue 15): bad inputs and faults, each with the outcome it must get.

Everything is generated at test time (nothing large is committed). Image cases go through the app's upload path,
the predict CLI and the Diagnose page; faults (tampered cards, bad routing files, unsafe data) through the code
that meets them. README "Bad input and faults" lists the kinds.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    kind: str
    filename: str
    data: bytes
    outcome: str  # "refused" (no probability, a reason) | "warned" (a probability and a warning) | "ok"
    says: str = ""  # a phrase the message must contain


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _he(w: int = 700, h: int = 460, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array([180, 90, 160], np.float32) + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels and whose data is one tiny IDAT: a decompression bomb's shape."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def image_cases() -> list[Case]:
    he = _he()
    png = _save(he, "PNG")
    jpg = _save(he, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    i16 = Image.fromarray(np.asarray(he.convert("L"), np.uint16) * 200)
    rgba = he.convert("RGBA")
    rgba.putalpha(Image.new("L", he.size, 128))
    return [
        Case("random bytes named .png", "junk.png", b"\x00junk\xff" * 50, "refused", "not a readable image"),
        Case("empty file", "empty.png", b"", "refused", "empty"),
        Case("truncated PNG", "truncated.png", png[: len(png) // 3], "refused", "corrupt or truncated"),
        Case("truncated JPEG (header intact)", "truncated.jpg", jpg[: len(jpg) // 2], "refused", "corrupt or truncated"),
        Case("text file named .png", "notes.png", b"patient notes, not an image\n" * 20, "refused", "not a readable image"),
        Case("HTML named .jpg", "page.jpg", b"<html><body>hi</body></html>", "refused", "not a readable image"),
        Case("GIF (not an accepted format)", "frame.gif", _save(he, "GIF"), "refused", "accepted formats"),
        Case("tiny image", "tiny.png", _save(_he(10, 10), "PNG"), "refused", "too small"),
        Case("36 MP canvas", "huge.png", _save(Image.new("RGB", (6000, 6000), (200, 100, 150)), "PNG"), "refused",
             "too large"),
        Case("decompression bomb header (100000 x 100000)", "bomb.png", _png_header_only(100_000, 100_000), "refused",
             "too large"),
        Case("file over 50 MB", "big.tif", b"II*\x00" + b"\x00" * (50 * 2**20 + 10), "refused", "larger than 50 MB"),
        Case("grayscale frame", "gray.png", _save(he.convert("L"), "PNG"), "warned", "grayscale"),
        Case("1-bit frame", "bits.png", _save(he.convert("1"), "PNG"), "warned", "grayscale"),
        Case("16-bit frame", "deep.png", _save(i16, "PNG"), "warned", "16-bit"),
        Case("float TIFF", "float.tif", _save(Image.fromarray(np.asarray(he.convert("L"), np.float32)), "TIFF"),
             "warned", "16-bit or float"),
        Case("semi-transparent RGBA", "alpha.png", _save(rgba, "PNG"), "warned", "transparent"),
        Case("CMYK JPEG", "cmyk.jpg", _save(he.convert("CMYK"), "JPEG"), "warned", "CMYK"),
        Case("EXIF-rotated JPEG", "rotated.jpg", _save(he, "JPEG", exif=exif), "warned", "EXIF"),
        Case("portrait frame", "portrait.png", _save(he.transpose(Image.Transpose.ROTATE_270), "PNG"), "warned",
             "portrait"),
        Case("large canvas (4200 x 2760)", "large.png", _save(he.resize((4200, 2760)), "PNG"), "warned", "reduced"),
        Case("JPEG named .png", "liar.png", jpg, "warned", "holds a JPEG"),
        Case("non-histology: flat blue square", "blue.png", _save(Image.new("RGB", (700, 460), (20, 40, 220)), "PNG"),
             "warned", "not a histology frame"),
        Case("all-black frame", "black.png", _save(Image.new("RGB", (700, 460)), "PNG"), "warned", ""),
        Case("palette PNG", "palette.png", _save(he.convert("P"), "PNG"), "ok"),
        Case("WebP frame", "frame.webp", _save(he, "WEBP"), "ok"),
        Case("BMP frame", "frame.bmp", _save(he, "BMP"), "ok"),
        Case("downscaled BreakHis frame (500 x 328)", "small.png", _save(he.resize((500, 328)), "PNG"), "ok"),
        Case("a good 700 x 460 PNG", "good.png", png, "ok"),
    ]


# Faults met outside image decoding, each exercised by tests/adversarial/test_corpus.py.
FAULTS = [
    "card: negative temperature (would invert every probability)",
    "card: zero temperature",
    "card: threshold 0.99 (would flip labels)",
    "card: input size 20000 (would exhaust memory)",
    "card: unknown field",
    "card: weights file path escaping the folder",
    "card: newer card_version than the software",
    "card: not JSON",
    "weights: one flipped byte (sha256 mismatch)",
    "defaults.json: malformed JSON",
    "defaults.json: a list instead of an object",
    "defaults.json: entry without model_id",
    "defaults.json: model_id escaping the models folder",
    "manifest: path with '..'",
    "manifest: absolute path",
    "manifest: slide id without digits",
    "data: truncated JPEG whose header verifies",
    "archive: unsafe member ('../' path)",
    "archive: corrupt gzip",
    "CLI: a path that does not exist",
]
