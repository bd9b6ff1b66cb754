"""Case mode (issue 16, part 2): frames judged together, referred frames counted and left out."""
import json
import subprocess
import sys

import pytest

from models.case import CaseFrame, case_verdict, magnification_from_name, resolve_magnification
from tests.conftest import FRAMES, ROOT, needs_shared


def test_magnification_is_read_from_breakhis_names_and_disagreement_is_said():
    assert magnification_from_name("SOB_B_A-14-22549AB-40-001.png") == "40X"
    assert magnification_from_name("SOB_M_DC-14-2523-400-012.tif") == "400X"
    assert magnification_from_name("my frame.png") is None
    mag, note = resolve_magnification("SOB_B_A-14-22549AB-200-001.png", "40X")
    assert mag == "200X" and "says 200X" in note
    assert resolve_magnification("x.png", "100X") == ("100X", "")


def _f(name, p, decision=None, mag="100X"):
    return CaseFrame(name, mag, "m", p, decision or ("malignant" if p >= 0.5 else "benign"))


def test_case_verdict_excludes_referred_frames_and_refers_when_frames_disagree():
    v = case_verdict([_f("a", 0.9), _f("b", 0.85), _f("c", 0.95), _f("d", 0.5, "refer")])
    assert v.verdict == "malignant" and v.n_referred == 1 and v.n_accepted == 3
    assert v.ci95[0] > 0.5 and abs(v.mean_p - 0.9) < 1e-9 and v.drivers[0]["name"] == "c"
    mixed = case_verdict([_f("a", 0.95), _f("b", 0.05), _f("c", 0.9), _f("d", 0.1)])
    assert mixed.verdict == "refer" and "contains the threshold" in mixed.reason
    assert case_verdict([_f("a", 0.5, "refer")]).verdict == "refer"
    mags = case_verdict([_f("a", 0.9, mag="40X"), _f("b", 0.8, mag="40X"), _f("c", 0.2, mag="400X"),
                         _f("d", 0.95, mag="40X"), _f("e", 0.9, mag="40X")])
    assert mags.magnifications_agree is False and mags.verdict == "refer"


@needs_shared
def test_case_cli_prints_the_verdict_as_json():
    files = sorted(str(p) for p in (FRAMES / "200X").glob("*.png"))[:4]
    r = subprocess.run([sys.executable, "-m", "models", "case", *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_frames"] == 4 and out["n_accepted"] + out["n_referred"] == 4
    assert out["verdict"] in ("benign", "malignant", "refer") and out["reason"]
    assert all(f["magnification"] == "200X" for f in out["frames"]) and out["model_cv_figures"]
