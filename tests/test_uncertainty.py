"""Per-frame uncertainty (issue 27): out-of-fold reliability bins with patient-bootstrap CIs, and the page's words."""
import json

import numpy as np

from models.uncertainty import band_position, bin_for, reliability_bins, short_uncertainty, uncertainty_line


def _oof(n_pat=30, per=10, seed=0):
    rng = np.random.default_rng(seed)
    pats = np.repeat([f"P{i}" for i in range(n_pat)], per)
    y = np.repeat(rng.integers(0, 2, n_pat), per)
    p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.2, len(y)), 0, 1)
    return p, y, pats


def test_bins_are_equal_count_and_their_share_is_the_observed_one():
    p, y, pats = _oof()
    bins = reliability_bins(p, y, pats, n_bins=5)
    assert len(bins) == 5 and bins[0].p_lo == 0.0 and bins[-1].p_hi == 1.0
    assert sum(b.n_frames for b in bins) == len(p) and all(55 <= b.n_frames <= 65 for b in bins)
    for b in bins:
        m = (p >= b.p_lo) & ((p < b.p_hi) if b.p_hi < 1 else (p <= 1))
        assert np.isclose(b.share_malignant, y[m].mean()) and b.ci[0] <= b.share_malignant <= b.ci[1]
        assert b.n_patients == len(set(pats[m]))
    assert bins[0].share_malignant < bins[-1].share_malignant


def test_the_ci_resamples_patients_not_frames():
    """One patient with many frames: a frame bootstrap would give a narrow CI; resampling patients keeps it wide."""
    pats = np.array(["A"] * 50 + ["B"] * 50)
    y = np.array([1] * 50 + [0] * 50)
    p = np.full(100, 0.5)
    (b,) = reliability_bins(p, y, pats, n_bins=1)
    assert b.n_patients == 2 and b.ci[0] == 0.0 and b.ci[1] == 1.0


def test_a_frame_falls_in_its_bin_and_the_words_say_where_it_sits():
    p, y, pats = _oof()
    bins = reliability_bins(p, y, pats)
    assert bin_for(0.0, bins) is bins[0] and bin_for(1.0, bins) is bins[-1]
    assert bin_for(float("nan"), bins) is None and bin_for(0.5, []) is None
    assert band_position(0.5, (0.3, 0.7)).startswith("inside the referral band")
    assert band_position(0.1, (0.3, 0.7)).startswith("0.20 below") and band_position(0.9, (0.3, 0.7)).startswith("0.20 above")
    line = uncertainty_line(0.9, bins, (0.3, 0.7))
    b = bin_for(0.9, bins)
    assert f"{b.n_frames} frames of {b.n_patients} patients" in line and f"{b.share_malignant:.0%} were malignant" in line
    assert "No out-of-fold predictions" in uncertainty_line(0.9, [], None)
    assert uncertainty_line(0.9, bins, (0.3, 0.7), with_band_position=False).startswith("Of the out-of-fold frames")
    assert short_uncertainty(0.9, bins).startswith(f"malignant in {b.share_malignant:.0%}")


def test_the_page_calls_an_uncertainty_validated_only_when_its_ci_is_above_chance(tmp_path):
    from app.dashboard import uncertainty_evidence_line

    from models.archs import file_sha256

    root = tmp_path / "models"
    for mid in ("all/m", "100X/m"):
        (root / mid).mkdir(parents=True)
        (root / mid / "card.json").write_text(json.dumps({"model_id": mid}))
    res = {"model": "magnif_models/all/m", "card_sha256": file_sha256(root / "all/m/card.json"), "patients": 38,
           "command": "python scripts/frame_uncertainty_check.py",
           "error_detection": {"error_rate": 0.3, "closeness_to_threshold":
                               {"auroc_for_errors": 0.58, "ci95": [0.45, 0.72], "validated": False}}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    line = uncertainty_evidence_line("all/m", f, root)
    assert "did not tell wrong calls from right ones better than chance" in line
    assert uncertainty_evidence_line("100X/m", f, root) == ""  # same folder name, another model: not shown
    res["error_detection"]["closeness_to_threshold"].update(ci95=[0.55, 0.72], validated=True)
    f.write_text(json.dumps(res))
    assert "better than chance only for closeness to the threshold" in uncertainty_evidence_line("all/m", f, root)
    (root / "all/m/card.json").write_text(json.dumps({"model_id": "all/m", "retrained": True}))
    assert uncertainty_evidence_line("all/m", f, root) == ""  # the card changed since it was measured


def test_the_baseline_comparison_is_said_in_words_from_a_paired_bootstrap(tmp_path):
    """'beats' only when the paired CI is above zero; 'does not beat' (lower) and 'not by a margin these patients can
    show' (higher, CI includes zero) otherwise; the words never say 'beats it by -0.013'."""
    import pandas as pd

    from app.dashboard import baseline_sentence

    rng = np.random.default_rng(0)
    pats = np.repeat([f"P{i}" for i in range(40)], 8)
    y = np.repeat(np.arange(40) % 2, 8)
    good = y + rng.normal(0, 0.4, len(y))
    noisy = y + rng.normal(0, 3.0, len(y))

    def sentence(model, base):
        d = tmp_path / f"m{rng.integers(1e9)}"
        d.mkdir()
        pd.DataFrame({"patient": pats, "label": y, "magnification": "100X", "p_malignant": model,
                      "p_baseline": base}).to_csv(d / "predictions.csv", index=False)
        return baseline_sentence(d, "100X", n_boot=300)

    assert sentence(good, noisy).startswith("This model beats the frozen-feature baseline")
    assert sentence(noisy, good).startswith("This model does not beat the frozen-feature baseline: its AUC is lower")
    close = good + rng.normal(0, 0.05, len(y))
    s = sentence(close, good)
    assert "does not beat" in s and "20 benign / 20 malignant patients" in s
    assert baseline_sentence(tmp_path / "absent") == ""
