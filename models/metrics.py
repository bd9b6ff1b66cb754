"""Metrics as plain functions over arrays, shared by the training CLI, the tests and the dashboard.

Confidence intervals bootstrap *patients* (stratified by label), since patients, not frames, are the
unit of evidence.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from models.card import TEMPERATURE_BOUNDS  # one bound for the fit guard and for card validation


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated p(malignant) from raw logits."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / float(temperature))


TEMPERATURE_FALLBACK = 1.0  # the documented default when a fit is undefined or lands on a bound: logits as they are


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the NLL on validation patients (Guo et al. 2017); 1.0 if undefined."""
    from scipy.optimize import minimize_scalar

    z, y = np.asarray(logits, float), np.asarray(y, float)
    if len(np.unique(y)) < 2 or len(z) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        p = np.clip(sigmoid(z / np.exp(log_t)), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    res = minimize_scalar(nll, bounds=tuple(np.log(TEMPERATURE_BOUNDS)), method="bounded")
    return float(np.exp(res.x))


def temperature_on_bound(t: float | None) -> bool:
    """Whether a fitted temperature sits on (within 1% of) a search bound: the data could not pin it down."""
    lo, hi = TEMPERATURE_BOUNDS
    return t is not None and (t <= lo * 1.01 or t >= hi * 0.99)


def fit_temperature_guarded(logits: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """Temperature with a guard: a fit on (within 1% of) a search bound says the validation set could not pin it
    down (e.g. one fold's few validation patients are all ranked wrongly), so the fold falls back to
    TEMPERATURE_FALLBACK and the returned note says so; otherwise the note is "fitted"."""
    z, yy = np.asarray(logits, float), np.asarray(y, float)
    if len(np.unique(yy)) < 2 or len(z) < 2:
        return TEMPERATURE_FALLBACK, "undefined (one class in validation): fallback 1.0"
    t = fit_temperature(z, yy)
    if temperature_on_bound(t):
        return TEMPERATURE_FALLBACK, f"fit landed on its bound ({t:.3g}): fallback 1.0"
    return t, "fitted"


def _safe_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def image_metrics(y: Sequence[int], p: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Image-level threshold and ranking metrics (malignant = positive class)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    return {
        "accuracy": float((tp + tn) / len(y)) if len(y) else float("nan"),
        "balanced_accuracy": float(np.nanmean([sens, spec])),
        "auc": _safe_auc(y, p),
        "sensitivity": float(sens),
        "specificity": float(spec),
        "precision": float(prec),
        "f1": float(f1),
    }


def patient_table(y: Sequence[int], p: Sequence[float], patients: Sequence, threshold: float = 0.5) -> list[dict]:
    """One row per patient: label, images, mean p(malignant), fraction of frames classified correctly."""
    y, p, patients = np.asarray(y, int), np.asarray(p, float), np.asarray(patients).astype(str)
    rows = []
    for pat in sorted(set(patients)):
        m = patients == pat
        lab = int(round(y[m].mean()))
        rows.append({
            "patient": pat, "label": lab, "n_images": int(m.sum()), "mean_p": float(p[m].mean()),
            "fraction_correct": float(((p[m] >= threshold).astype(int) == y[m]).mean()),
        })
    return rows


def patient_metrics(y: Sequence[int], p: Sequence[float], patients: Sequence, threshold: float = 0.5) -> dict[str, float]:
    """Patient-level accuracy/AUC (mean probability per patient) and the BreakHis patient score."""
    rows = patient_table(y, p, patients, threshold)
    py = np.array([r["label"] for r in rows])
    pp = np.array([r["mean_p"] for r in rows])
    return {
        "patient_accuracy": float(((pp >= threshold).astype(int) == py).mean()),
        "patient_auc": _safe_auc(py, pp),
        # Spanhol et al. 2016: mean over patients of the fraction of that patient's images correct
        "patient_score": float(np.mean([r["fraction_correct"] for r in rows])),
    }


def reliability_curve(y: Sequence[int], p: Sequence[float], n_bins: int = 10) -> dict[str, list]:
    """Equal-width bins: mean predicted probability, observed malignant fraction and count per bin."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        m = idx == b
        count.append(int(m.sum()))
        conf.append(float(p[m].mean()) if m.any() else float("nan"))
        acc.append(float(y[m].mean()) if m.any() else float("nan"))
    return {"bin_edges": edges.tolist(), "mean_predicted": conf, "fraction_malignant": acc, "count": count}


def expected_calibration_error(y: Sequence[int], p: Sequence[float], n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed - predicted| over equal-width bins."""
    rc = reliability_curve(y, p, n_bins)
    n = sum(rc["count"])
    return float(sum(c * abs(a - m) for c, a, m in zip(rc["count"], rc["fraction_malignant"], rc["mean_predicted"]) if c) / n) if n else float("nan")


def all_metrics(y: Sequence[int], p: Sequence[float], patients: Sequence, threshold: float = 0.5,
                score: Sequence[float] | None = None) -> dict[str, float]:
    """Every scalar metric we report, image and patient level plus calibration.

    `score` (e.g. raw out-of-fold logits) ranks images for the AUC when given: pooled cross-validation
    predictions are calibrated with a different temperature per fold, a monotone rescaling per fold that
    would otherwise distort the pooled ranking. Threshold and calibration metrics use `p`.
    """
    out = image_metrics(y, p, threshold)
    if score is not None:
        out["auc"] = _safe_auc(np.asarray(y, int), np.asarray(score, float))
    out.update(patient_metrics(y, p, patients, threshold))
    out["ece"] = expected_calibration_error(y, p)
    out["brier"] = float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))
    return out


def patient_resamples(y: np.ndarray, patients: np.ndarray, n_boot: int, seed: int = 0):
    """Yield (frame indices, patient ids) of n_boot bootstrap samples drawn by patient within each label.

    A patient drawn twice becomes two patients (new ids), so patient-level metrics count it twice.
    """
    rng = np.random.default_rng(seed)
    groups = {pat: np.flatnonzero(patients == pat) for pat in np.unique(patients)}
    by_label = {lab: [g for g in groups if int(round(y[groups[g]].mean())) == lab] for lab in (0, 1)}
    for b in range(n_boot):
        idx, pats = [], []
        for lab, pats_l in by_label.items():
            if not pats_l:
                continue
            for j, g in enumerate(rng.choice(pats_l, size=len(pats_l), replace=True)):
                idx.append(groups[g])
                pats.extend([f"{g}#{b}_{lab}_{j}"] * len(groups[g]))
        yield np.concatenate(idx), np.array(pats)


def bootstrap_patients(
    y: Sequence[int], p: Sequence[float], patients: Sequence, fn: Callable[..., dict[str, float]],
    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, **kw,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric `fn` returns, resampling patients within each label."""
    y, p, patients = np.asarray(y, int), np.asarray(p, float), np.asarray(patients).astype(str)
    score = kw.pop("score", None)
    score = None if score is None else np.asarray(score, float)
    samples: dict[str, list[float]] = {}
    for idx, pats in patient_resamples(y, patients, n_boot, seed):
        extra = {"score": score[idx]} if score is not None else {}
        for k, v in fn(y[idx], p[idx], pats, **kw, **extra).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, vals in samples.items():
        v = np.asarray(vals, float)
        v = v[np.isfinite(v)]
        out[k] = (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) if len(v) else (float("nan"),) * 2
    return out


def summarize(y: Sequence[int], p: Sequence[float], patients: Sequence, threshold: float = 0.5,
              n_boot: int = 1000, seed: int = 0, score: Sequence[float] | None = None) -> dict:
    """Metrics with 95% patient-bootstrap CIs, confusion matrix and counts, ready for a card."""
    y, p, patients = np.asarray(y, int), np.asarray(p, float), np.asarray(patients).astype(str)
    point = all_metrics(y, p, patients, threshold, score=score)
    ci = bootstrap_patients(y, p, patients, all_metrics, n_boot=n_boot, seed=seed, threshold=threshold,
                            score=score) if n_boot else {}
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    pt = patient_table(y, p, patients, threshold)
    return {
        "metrics": {k: {"value": v, "ci95": list(ci.get(k, (float("nan"), float("nan"))))} for k, v in point.items()},
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "n_images": {"benign": int((y == 0).sum()), "malignant": int((y == 1).sum())},
        "n_patients": {"benign": sum(r["label"] == 0 for r in pt), "malignant": sum(r["label"] == 1 for r in pt)},
        "threshold": threshold,
        "bootstrap": {"unit": "patient, stratified by label", "n": n_boot, "seed": seed},
        "auc_from": "raw out-of-fold scores (per-fold calibration is a monotone rescaling)" if score is not None
                    else "probabilities",
    }


FOLD_FIGURES = ("auc", "accuracy", "balanced_accuracy", "patient_accuracy")


def fold_figures(y: np.ndarray, p: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """The point figures recorded for each CV fold (no bootstrap: the folds' spread is the uncertainty)."""
    m = summarize(y, p, patients, n_boot=0)["metrics"]
    return {k: m[k]["value"] for k in FOLD_FIGURES}


def curve_points(y: Sequence[int], p: Sequence[float], max_points: int = 200,
                 score: Sequence[float] | None = None) -> dict:
    """ROC and PR points (ranked by `score` when given) and reliability points, thinned for plotting."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    r = p if score is None else np.asarray(score, float)
    out: dict = {"reliability": reliability_curve(y, p)}
    if len(np.unique(y)) == 2:
        fpr, tpr, thr = skm.roc_curve(y, r)
        prec, rec, _ = skm.precision_recall_curve(y, r)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).round().astype(int))
        keep_pr = np.unique(np.linspace(0, len(prec) - 1, min(max_points, len(prec))).round().astype(int))
        out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                      "threshold": np.where(np.isfinite(thr[keep]), thr[keep], 1.0).tolist()}
        out["pr"] = {"precision": prec[keep_pr].tolist(), "recall": rec[keep_pr].tolist()}
    return out


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count half), equal to roc_auc_score. Written out because the paired
    bootstrap calls it 4,000 times per comparison and sklearn's per-call input validation dominated the run time."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(s)[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def paired_auc_difference(y: Sequence[int], score_challenger: Sequence[float], score_incumbent: Sequence[float],
                          patients: Sequence, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """AUC(challenger) - AUC(incumbent) on the same frames, with a paired patient-bootstrap CI.

    Both models' scores are resampled together (patients within each label, as in bootstrap_patients), so the
    CI reflects how much the *difference* moves when other patients are drawn, not the two AUCs' own widths.
    """
    y = np.asarray(y, int)
    a, b = np.asarray(score_challenger, float), np.asarray(score_incumbent, float)
    patients = np.asarray(patients).astype(str)
    point = _safe_auc(y, a) - _safe_auc(y, b)
    diffs = []
    for idx, _ in patient_resamples(y, patients, n_boot, seed):
        d = _rank_auc(y[idx], a[idx]) - _rank_auc(y[idx], b[idx])
        if np.isfinite(d):
            diffs.append(d)
    lo, hi = ((float(np.quantile(diffs, alpha / 2)), float(np.quantile(diffs, 1 - alpha / 2))) if diffs
              else (float("nan"), float("nan")))
    return {"difference": float(point), "ci95": [lo, hi], "n_boot": n_boot, "seed": seed,
            "n_images": int(len(y)), "n_patients": {"benign": len(set(patients[y == 0])), "malignant": len(set(patients[y == 1]))},
            "auc_challenger": _safe_auc(y, a), "auc_incumbent": _safe_auc(y, b)}
