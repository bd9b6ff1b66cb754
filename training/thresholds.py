"""Does a per-magnification decision threshold help a pooled model on patients it was not fitted on? (issue 25)

Nested on the model's out-of-fold predictions: five patient-grouped outer folds; on the other four fifths the
temperatures (training.case_policy.fit_temperatures) and, for each magnification with >= 5 patients of each class
there, the threshold that maximises the patient-balanced balanced accuracy are fitted; the held-out fifth is called
with those thresholds and with the single threshold 0.5 (the card's). The two are compared on every held-out frame
by a paired patient bootstrap; the per-magnification thresholds are adopted only when the CI of the gain in
balanced accuracy lies above zero (the paired rule, fixed before the numbers were seen)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.metrics import patient_resamples
from models.routing.thresholds import MIN_PATIENTS_PER_CLASS
from training.case_policy import calibrate, fit_temperatures
from training.engine import sample_weights
from training.splits import stratified_group_folds

GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def _balanced_accuracy(y: np.ndarray, call: np.ndarray, w: np.ndarray) -> float:
    """Balanced accuracy with each frame weighted so patients count equally within their class."""
    out = []
    for lab in (0, 1):
        m = y == lab
        if m.any():
            out.append(float(np.sum(w[m] * (call[m] == lab)) / np.sum(w[m])))
    return float(np.mean(out)) if out else float("nan")


def fit_thresholds(p: np.ndarray, y: np.ndarray, mags: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """Each magnification's threshold (where it has enough patients of each class), maximising balanced accuracy."""
    out = {}
    for g in sorted(set(mags)):
        m = mags == g
        n = [len(set(patients[m & (y == k)])) for k in (0, 1)]
        if min(n) < MIN_PATIENTS_PER_CLASS:
            continue
        w = sample_weights(y[m], patients[m])
        scores = [_balanced_accuracy(y[m], (p[m] >= t).astype(int), w) for t in GRID]
        out[g] = float(GRID[int(np.argmax(scores))])
    return out


def per_magnification_threshold_cv(folder: str | Path, k: int = 5, seed: int = 0, n_boot: int = 2000) -> dict:
    pred = pd.read_csv(Path(folder) / "predictions.csv", dtype={"patient": str})
    pred = pred[pred["logit"].notna()].reset_index(drop=True)
    y, pats = pred["label"].to_numpy(int), pred["patient"].to_numpy(str)
    mags, z = pred["magnification"].to_numpy(str), pred["logit"].to_numpy(float)
    outer = stratified_group_folds(y, pats, k, seed)
    call_single, call_mag = np.zeros(len(y), int), np.zeros(len(y), int)
    folds = []
    for f in range(k):
        te, tr = outer == f, outer != f
        pooled, by_mag = fit_temperatures(z[tr], y[tr], mags[tr], pats[tr])
        p = calibrate(z, mags, pooled, by_mag)
        th = fit_thresholds(p[tr], y[tr], mags[tr], pats[tr])
        t_frame = np.array([th.get(g, 0.5) for g in mags])
        call_single[te] = (p[te] >= 0.5).astype(int)
        call_mag[te] = (p[te] >= t_frame[te]).astype(int)
        folds.append({"fold": f, "thresholds": th, "n_patients_held_out": int(len(set(pats[te])))})
    w = sample_weights(y, pats)
    ba_single, ba_mag = _balanced_accuracy(y, call_single, w), _balanced_accuracy(y, call_mag, w)
    diffs = []
    for idx, newpats in patient_resamples(y, pats, n_boot, seed):
        wb = sample_weights(y[idx], newpats)
        diffs.append(_balanced_accuracy(y[idx], call_mag[idx], wb) - _balanced_accuracy(y[idx], call_single[idx], wb))
    lo, hi = (float(np.quantile(diffs, q)) for q in (0.025, 0.975))
    per_mag = {}
    for g in sorted(set(mags)):
        m = mags == g
        wg = sample_weights(y[m], pats[m])
        per_mag[g] = {"single": _balanced_accuracy(y[m], call_single[m], wg),
                      "per_magnification": _balanced_accuracy(y[m], call_mag[m], wg),
                      "n_patients": {"benign": len(set(pats[m & (y == 0)])), "malignant": len(set(pats[m & (y == 1)]))}}
    return {"model": str(folder), "protocol": f"{k} patient-grouped outer folds (seed {seed}) on the out-of-fold "
            "predictions; temperatures and thresholds fitted on the other folds' patients, scored on the held-out "
            "fold; balanced accuracy with patients weighted equally within their class",
            "balanced_accuracy_single_threshold": ba_single, "balanced_accuracy_per_magnification": ba_mag,
            "difference": ba_mag - ba_single, "ci95": [lo, hi], "adopted": bool(lo > 0), "per_magnification": per_mag,
            "folds": folds, "n_patients": {"benign": len(set(pats[y == 0])), "malignant": len(set(pats[y == 1]))},
            "rule": "adopted only when the paired patient-bootstrap 95% CI of the gain lies above zero"}


def write_threshold_cv(folder: str | Path, out: str | Path) -> dict:
    res = per_magnification_threshold_cv(folder)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res
