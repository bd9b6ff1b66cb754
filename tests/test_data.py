import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DATA, ROOT, build_official_tree, needs_shared
from training.data import (fetch_breakhis, index_manifest, index_source, index_tree, parse_breakhis_name,
                           patient_from_slide, unpack_archive)


def test_parse_official_name():
    f = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
    assert f == {"label": "benign", "subtype": "adenosis", "magnification": "40X", "slide": "22549AB", "patient": "22549"}
    assert parse_breakhis_name("SOB_M_DC-14-13412-400-010.png")["subtype"] == "ductal_carcinoma"
    assert parse_breakhis_name("holiday.png") is None


@pytest.mark.parametrize("slide", ["22549AB", "22549CD", "22549G", "22549"])
def test_patient_from_slide(slide):
    assert patient_from_slide(slide) == "22549"


def _png(path: Path, color=(200, 120, 180)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (700, 460), color).save(path)


def test_index_tree_skips_bad_files_without_crashing(tmp_path):
    base = tmp_path / "breast"
    good = base / "benign/SOB/adenosis/SOB_B_A-14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png"
    _png(good)
    mis = base / "benign/SOB/adenosis/SOB_B_A-14-22549AB/100X/SOB_M_DC-14-2523-100-001.png"
    _png(mis)
    corrupt = base / "malignant/SOB/ductal_carcinoma/SOB_M_DC-14-2523/100X/SOB_M_DC-14-2523-100-002.png"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a png at all")
    empty = corrupt.with_name("SOB_M_DC-14-2523-100-003.png")
    empty.write_bytes(b"")
    res = index_tree(tmp_path)
    assert list(res.frame["path"]) == [str(good.resolve())]
    reasons = dict(res.skipped)
    assert "mislabelled" in reasons[str(mis)]
    assert "unreadable" in reasons[str(corrupt)]
    assert "empty" in reasons[str(empty)]
    assert "3 skipped" in res.summary()


@needs_shared
def test_index_manifest_folder():
    res = index_manifest(DATA)
    df = res.frame
    assert len(df) == 550 and df["patient"].nunique() == 38
    assert set(df.columns) >= {"path", "label", "subtype", "magnification", "slide", "patient"}
    assert all(Path(p).is_file() for p in df["path"].head(5))


@needs_shared
def test_index_official_tree_and_archive(tmp_path, official_archive):
    tree = build_official_tree(tmp_path)
    a = index_source(tree).frame
    assert len(a) == len(list(tree.rglob("*.png"))) >= 12 and a["patient"].nunique() == 6
    assert set(a["label"]) == {"benign", "malignant"} and set(a["magnification"]) == {"100X"}
    cache = tmp_path / "cache"
    b = index_source(official_archive, cache).frame
    assert sorted(Path(p).name for p in a["path"]) == sorted(Path(p).name for p in b["path"])
    marker = next(cache.glob("archives/*/.complete"))
    mtime = marker.stat().st_mtime
    unpack_archive(official_archive, cache)  # unpacked once, then reused
    assert marker.stat().st_mtime == mtime


def test_corrupt_archive_is_reported(tmp_path):
    bad = tmp_path / "BreaKHis_v1.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        unpack_archive(bad, tmp_path / "c")


def test_fetch_without_network_says_what_to_do(tmp_path):
    with pytest.raises(ConnectionError, match="--data"):
        fetch_breakhis(tmp_path, "http://127.0.0.1:9/BreaKHis_v1.tar.gz", timeout=2)
    r = subprocess.run([sys.executable, "-m", "training", "fetch-breakhis", "--to", str(tmp_path),
                        "--url", "http://127.0.0.1:9/BreaKHis_v1.tar.gz"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Download BreaKHis_v1.tar.gz by hand" in r.stderr and "Traceback" not in r.stderr
