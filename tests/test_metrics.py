import numpy as np
import pytest

from models.metrics import (apply_temperature, bootstrap_patients, expected_calibration_error, fit_temperature,
                            image_metrics, patient_metrics, summarize)


def test_image_metrics_known_values():
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    p = [0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95]
    m = image_metrics(y, p)
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(14 / 15)


def test_patient_level_and_breakhis_patient_score():
    y = [0, 0, 1, 1, 1]
    p = [0.2, 0.7, 0.9, 0.1, 0.8]
    pats = ["a", "a", "b", "b", "c"]
    m = patient_metrics(y, p, pats)
    # patient a: mean .45 -> benign (correct), b: .5 -> malignant (correct), c: correct
    assert m["patient_accuracy"] == 1.0
    assert m["patient_score"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_calibration_and_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 5000)
    y = (rng.random(5000) < apply_temperature(z, 1.0)).astype(int)
    assert expected_calibration_error(y, apply_temperature(z, 1.0)) < 0.03
    overconfident = z * 3
    assert expected_calibration_error(y, apply_temperature(overconfident, 1.0)) > 0.05
    assert fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.15)


def test_patient_bootstrap_ci_brackets_point_and_widens_with_fewer_patients():
    rng = np.random.default_rng(1)
    pats = np.repeat(np.arange(40), 10)
    y = (pats % 2).astype(int)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    s = summarize(y, p, pats, n_boot=200)
    auc = s["metrics"]["auc"]
    assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    few = pats < 6
    ci_few = bootstrap_patients(y[few], p[few], pats[few], lambda a, b, c: {"auc": image_metrics(a, b)["auc"]}, n_boot=200)
    assert ci_few["auc"][1] - ci_few["auc"][0] > auc["ci95"][1] - auc["ci95"][0]
    assert s["n_patients"] == {"benign": 20, "malignant": 20}


def test_pooled_auc_ranks_raw_scores_not_per_fold_calibrated_probabilities():
    # two folds, each perfectly ranked, but calibrated with very different temperatures
    y = np.array([0, 1, 0, 1])
    logit = np.array([-1.0, 1.0, -1.0, 1.0])
    p = apply_temperature(logit, 1.0)
    p[2:] = apply_temperature(logit[2:] + 5, 1.0)  # fold 2 shifted: its benign now outranks fold 1's malignant
    from models.metrics import all_metrics

    assert all_metrics(y, p, ["a", "b", "c", "d"])["auc"] < 1.0
    assert all_metrics(y, p, ["a", "b", "c", "d"], score=logit)["auc"] == 1.0
    s = summarize(y, p, ["a", "b", "c", "d"], n_boot=20, score=logit)
    assert s["metrics"]["auc"]["value"] == 1.0 and s["auc_from"].startswith("raw")
