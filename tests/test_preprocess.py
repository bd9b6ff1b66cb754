import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.archs import ARCHITECTURES
from models.card import PreprocessConfig
from models.preprocess import ImageError, frame_to_tensor, frame_to_uint8, load_image, normalize_uint8
from models.quality import check_quality
from tests.conftest import FRAMES, needs_shared
from training.engine import cache_images

CFG = PreprocessConfig(input_size=(230, 350), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def test_whole_frame_is_kept_no_centre_crop():
    arr = np.full((460, 700, 3), 128, np.uint8)
    arr[:, :35] = (255, 0, 0)  # left 5% red
    arr[:, -35:] = (0, 0, 255)  # right 5% blue
    arr[:23] = (0, 255, 0)  # top 5% green
    t = frame_to_uint8(Image.fromarray(arr), CFG)
    assert t.shape == (3, 230, 350)
    assert t[0, 115, 2] > 200 and t[2, 115, -3] > 200 and t[1, 2, 175] > 200


@needs_shared
def test_training_cache_and_inference_give_the_same_tensor():
    path = str(next(FRAMES.glob("100X/*.png")))
    for arch in ARCHITECTURES.values():
        cfg = PreprocessConfig(input_size=arch.input_size, mean=arch.mean, std=arch.std)
        cached, keep, skipped = cache_images(pd.DataFrame({"path": [path]}), cfg)
        assert torch.equal(normalize_uint8(cached, cfg)[0], frame_to_tensor(load_image(path).image, cfg))


def test_bad_inputs_get_clear_messages(tmp_path):
    good = Image.new("RGB", (700, 460), (190, 110, 170))
    cases = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        "text.png": b"hello, I am not an image",
        "truncated.png": _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (460, 700, 3), np.uint8)))[:5000],
        "tiny.png": _bytes(Image.new("RGB", (20, 20))),
        "empty.png": b"",
    }
    for name, data in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(data, name=name)
        assert name in str(e.value)
    bomb = Image.new("1", (9000, 9000))
    with pytest.raises(ImageError, match="too large"):
        load_image(_bytes(bomb), name="bomb.png")
    assert load_image(_bytes(good)).warnings == []


def test_unusual_modes_are_converted_with_warnings():
    rgba = Image.new("RGBA", (200, 150), (200, 100, 150, 0))
    assert "transparent" in " ".join(load_image(_bytes(rgba)).warnings)
    grey = Image.new("L", (200, 150), 120)
    assert "grayscale" in " ".join(load_image(_bytes(grey)).warnings)
    deep = Image.fromarray((np.arange(200 * 150).reshape(150, 200) % 65535).astype(np.uint16))
    li = load_image(_bytes(deep))
    assert li.image.mode == "RGB" and "16-bit" in " ".join(li.warnings)
    pal = Image.new("RGB", (200, 150), (200, 100, 150)).convert("P")
    assert load_image(_bytes(pal)).image.mode == "RGB"
    cmyk = Image.new("CMYK", (200, 150), (10, 60, 10, 0))
    assert "CMYK" in " ".join(load_image(_bytes(cmyk, "JPEG")).warnings)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rot = load_image(_bytes(Image.new("RGB", (300, 200), (200, 100, 150)), "JPEG", exif=exif))
    assert rot.image.size == (300, 200) and "EXIF" in " ".join(rot.warnings) and "portrait" in " ".join(rot.warnings)


def test_quality_flags_non_histology_and_blur():
    green = Image.new("RGB", (700, 460), (40, 160, 60))
    q = check_quality(green)
    assert q.out_of_distribution and any("H&E" in w for w in q.warnings)
    assert any("blurry" in w for w in q.warnings)
    white = Image.new("RGB", (700, 460), (250, 250, 250))
    assert any("little tissue" in w for w in check_quality(white).warnings)


@needs_shared
def test_real_frames_pass_colour_check():
    for path in sorted(FRAMES.glob("*/*.png")):
        q = check_quality(Image.open(path).convert("RGB"))
        assert not q.out_of_distribution, (path, q)
