"""Subtypes (issue 17, first part): flat and hierarchical heads, patient-grouped folds, honest class reporting."""
import numpy as np
import pandas as pd
import pytest

from training.subtypes import (BENIGN_SUBTYPES, SUBTYPES, fit_subtype_model, markdown_tables, out_of_fold,
                               subtype_calls, subtype_codes, subtype_cv, subtype_metrics)


def _synthetic(n_pat_per_class=(3, 3, 2, 3, 5, 3, 3, 3), frames=6, signal=1.0, patient_noise=3.0, seed=0):
    """Frames whose features carry a class signal plus a strong per-patient offset (as a slide's staining does)."""
    rng = np.random.default_rng(seed)
    rows, x = [], []
    centres = rng.normal(0, 1, (len(SUBTYPES), 16))
    pid = 0
    for c, n in enumerate(n_pat_per_class):
        for _ in range(n):
            off = rng.normal(0, patient_noise, 16)
            for _ in range(frames):
                x.append(signal * centres[c] + off + rng.normal(0, 0.3, 16))
                rows.append({"patient": f"p{pid}", "subtype": SUBTYPES[c],
                             "label": "benign" if SUBTYPES[c] in BENIGN_SUBTYPES else "malignant",
                             "magnification": "100X"})
            pid += 1
    return pd.DataFrame(rows), np.array(x)


def test_hierarchical_subtype_always_agrees_with_its_binary_call():
    df, x = _synthetic(signal=0.5)
    codes = subtype_codes(df)
    prob = fit_subtype_model(x, codes, df["patient"].to_numpy(), "hierarchical")(x + 0.5)
    np.testing.assert_allclose(prob.sum(1), 1, atol=1e-9)
    nb = len(BENIGN_SUBTYPES)
    p_malignant = prob[:, nb:].sum(1)
    assert ((subtype_calls(prob, True) >= nb) == (p_malignant >= 0.5)).all()  # the subtype agrees with the binary call
    split = np.array([[0.45, 0, 0, 0, 0.14, 0.14, 0.14, 0.13]])  # malignant by its parent, benign by the bare argmax
    assert subtype_calls(split, True)[0] >= nb and subtype_calls(split, False)[0] == 0
    flat = fit_subtype_model(x, codes, df["patient"].to_numpy(), "flat")(x)
    np.testing.assert_allclose(flat.sum(1), 1, atol=1e-9)


def test_unknown_subtype_is_refused():
    df, _ = _synthetic()
    df.loc[0, "subtype"] = "sarcoma"
    with pytest.raises(ValueError, match="unknown subtype"):
        subtype_codes(df)


def test_image_wise_split_inflates_scores_when_patients_differ():
    """The leakage the issue asks to show: with patient-specific features, frames of a seen patient are easy."""
    df, x = _synthetic(signal=0.3, patient_noise=4.0)
    codes, pats = subtype_codes(df), df["patient"].to_numpy()
    grouped = out_of_fold(x, codes, pats, "flat", (0,), 3)
    leaky = out_of_fold(x, codes, pats, "flat", (0,), 3, leakage=True)
    acc = lambda p: (p.argmax(1) == codes).mean()  # noqa: E731
    assert acc(leaky) > acc(grouped) + 0.3


def test_classes_with_too_few_patients_are_reported_not_averaged():
    df, x = _synthetic()
    res = subtype_cv(df, x, split_seeds=(0,), k=3, n_boot=20)
    assert SUBTYPES[2] in res["not_testable"] and SUBTYPES[2] not in res["testable"]  # 2 patients
    grouped = res["results"]["flat"]["metrics"]
    assert grouped["recall/" + SUBTYPES[2]]["value"] is not None  # shown ...
    codes = subtype_codes(df)
    prob = np.eye(len(SUBTYPES))[codes]
    prob[codes == 2] = np.eye(len(SUBTYPES))[0]  # ... but a wholly wrong untestable class leaves the macro scores at 1
    m = subtype_metrics(codes, prob, df["patient"].to_numpy(), [c for c in range(8) if c != 2])
    assert m["balanced_accuracy"] == 1.0 and m["recall/" + SUBTYPES[2]] == 0.0
    assert "leakage" in markdown_tables(res) and "too few patients to test" in markdown_tables(res)
    lo, hi = grouped["balanced_accuracy"]["ci95"]
    assert lo <= grouped["balanced_accuracy"]["value"] <= hi
