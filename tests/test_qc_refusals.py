"""Issue 25: quality control passes real tissue (<= 2% of the shared frames refused, no patient losing more than a
third) and still refuses every generated non-histology image and every IDC-scale patch shown as a frame."""
import sys
from pathlib import Path

import numpy as np
import pytest

from models import quality as Q
from training.refer import OOD_KINDS, idc_patches, ood_corpus

ROOT = Path(__file__).resolve().parent.parent
BREAKHIS = ROOT.parent / "shared" / "data" / "breakhis"
IDC = ROOT.parent / "shared" / "data" / "idc"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _refused(img) -> bool:
    q = Q.check_quality(img)
    return bool(Q.qc_failures(q)) or q.out_of_distribution


def test_generated_non_histology_is_refused_every_time():
    corpus = ood_corpus(n=96, seed=3)
    kinds = {name.split("-")[1] for name, _ in corpus}
    assert kinds == set(OOD_KINDS) and "text" in kinds
    missed = [name for name, im in corpus if not _refused(im)]
    assert missed == []


@pytest.mark.skipif(not IDC.is_dir(), reason="../shared/data/idc is absent")
def test_idc_patches_blown_up_to_a_frame_are_refused():
    patches = idc_patches(IDC, n=300, seed=1)
    assert len(patches) == 300
    assert [n for n, im in patches if not _refused(im)] == []


@pytest.mark.skipif(not BREAKHIS.is_dir(), reason="../shared/data/breakhis is absent")
def test_qc_passes_real_tissue_and_follows_its_rule():
    from qc_refusals import CHECKS, measure, refusal_table, rule_threshold

    m = measure(BREAKHIS)
    table = refusal_table(m)
    assert table["any"]["share"] <= 0.02
    assert table["any"]["patients_losing_over_a_third"] == 0
    # the thresholds in models.quality are the rule's output on these patients (not hand-tuned numbers)
    consts = {"blur": Q.BLUR_VAR_MIN, "tissue": Q.TISSUE_FRACTION_MIN, "he_colour": Q.HE_FRACTION_MIN}
    for name, col in CHECKS.items():
        assert rule_threshold(m[col], m["patient"]) == pytest.approx(consts[name]), name
    assert np.isfinite(m["flat_frame_fraction"]).all() and m["flat_frame_fraction"].max() < Q.FLAT_FRAME_MAX
