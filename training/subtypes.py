"""The eight BreakHis subtypes, flat and hierarchical, under patient-grouped CV (issue 17, first part).

Recipe: frozen ImageNet Lite2 embeddings of the frame's native-resolution 2x3 tiles, averaged (the strongest
frozen recipe of the generalisation work), then multinomial logistic regression. Flat: one 8-class head.
Hierarchical (as in the published binary-then-subtype systems): a benign/malignant head, a benign-subtype head
trained on benign frames and a malignant-subtype head trained on malignant frames; P(subtype) = P(parent) x
P(subtype | parent), so the subtype always agrees with the binary call.

Evaluation: 3 split seeds x 5 folds stratified by subtype and grouped by patient; out-of-fold probabilities
averaged over the seeds; per-class recall/precision, balanced accuracy and macro-F1 over the classes with enough
patients to test, the confusion matrix, and patient-level accuracy, each with a patient-bootstrap 95% CI. The same
recipe on an image-wise random split (frames of one patient on both sides) is reported beside it, labelled as
leakage, to show how much such splits inflate subtype scores.

    python -m training subtype-cv --data ../shared/data/breakhis --out benchmarks/results/subtype_cv.json
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from training.engine import sample_weights
from training.splits import stratified_group_folds

log = logging.getLogger("training")

BENIGN_SUBTYPES = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma")
MALIGNANT_SUBTYPES = ("ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma")
SUBTYPES = BENIGN_SUBTYPES + MALIGNANT_SUBTYPES
MIN_TEST_PATIENTS = 3  # fewer: a tested patient leaves at most one of its class to learn from; reported, not averaged
STRATEGIES = ("flat", "hierarchical")


def subtype_codes(df: pd.DataFrame) -> np.ndarray:
    """Index into SUBTYPES per row; an unknown subtype is refused (never mapped silently to a class)."""
    unknown = sorted(set(df["subtype"]) - set(SUBTYPES))
    if unknown:
        raise ValueError(f"unknown subtype label(s) {unknown}; expected one of {list(SUBTYPES)}")
    return df["subtype"].map({s: i for i, s in enumerate(SUBTYPES)}).to_numpy()


def _fit_lr(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: np.ndarray):
    """A multinomial LR on standardised features; predict_proba spread over `classes` (absent ones get 0)."""
    sc = StandardScaler().fit(x)
    present = np.unique(y)
    if len(present) == 1:
        def proba(xt: np.ndarray) -> np.ndarray:
            out = np.zeros((len(xt), len(classes)))
            out[:, np.searchsorted(classes, present[0])] = 1.0
            return out
        return proba
    # each patient weighs the same within its class and each class the same: a patient with 80 frames must not
    # outvote four with 5, nor the commonest subtype drown the rare ones
    lr = LogisticRegression(C=0.05, max_iter=2000).fit(sc.transform(x), y, sample_weight=sample_weights(y, groups, present))

    def proba(xt: np.ndarray) -> np.ndarray:
        out = np.zeros((len(xt), len(classes)))
        out[:, np.searchsorted(classes, lr.classes_)] = lr.predict_proba(sc.transform(xt))
        return out
    return proba


def fit_subtype_model(x: np.ndarray, codes: np.ndarray, groups: np.ndarray, strategy: str):
    """A function from features to (N, 8) subtype probabilities, fitted on (x, codes)."""
    allc = np.arange(len(SUBTYPES))
    if strategy == "flat":
        return _fit_lr(x, codes, groups, allc)
    if strategy != "hierarchical":
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    nb = len(BENIGN_SUBTYPES)
    malignant = (codes >= nb).astype(int)
    parent = _fit_lr(x, malignant, groups, np.array([0, 1]))
    ben = _fit_lr(x[malignant == 0], codes[malignant == 0], groups[malignant == 0], allc[:nb])
    mal = _fit_lr(x[malignant == 1], codes[malignant == 1], groups[malignant == 1], allc[nb:])

    def proba(xt: np.ndarray) -> np.ndarray:
        pp = parent(xt)
        return np.hstack([pp[:, :1] * ben(xt), pp[:, 1:] * mal(xt)])
    return proba


def subtype_calls(prob: np.ndarray, hierarchical: bool) -> np.ndarray:
    """The called subtype per row. Hierarchical: the binary call first (P(malignant) = the malignant subtypes'
    sum >= 0.5), then the likeliest subtype within it, so the subtype always agrees with the binary call (the
    argmax of the products alone need not). Flat: the likeliest of the eight."""
    if not hierarchical:
        return prob.argmax(1)
    nb = len(BENIGN_SUBTYPES)
    malignant = prob[:, nb:].sum(1) >= 0.5
    return np.where(malignant, nb + prob[:, nb:].argmax(1), prob[:, :nb].argmax(1))


def subtype_metrics(codes: np.ndarray, prob: np.ndarray, patients: np.ndarray, testable: list[int],
                    hierarchical: bool = False) -> dict:
    """Per-class recall/precision/F1, balanced accuracy and macro-F1 over the testable classes, patient accuracy
    (a patient = its frames' mean probabilities), and the row-normalised confusion matrix."""
    pred = subtype_calls(prob, hierarchical)
    k = len(SUBTYPES)
    cm = np.zeros((k, k))
    np.add.at(cm, (codes, pred), 1)
    out: dict = {}
    f1s, recs = [], []
    for c in range(k):
        tp, n_true, n_pred = cm[c, c], cm[c].sum(), cm[:, c].sum()
        rec = tp / n_true if n_true else np.nan
        prec = tp / n_pred if n_pred else np.nan
        f1 = 2 * tp / (n_true + n_pred) if n_true + n_pred else np.nan
        out[f"recall/{SUBTYPES[c]}"], out[f"precision/{SUBTYPES[c]}"] = rec, prec
        if c in testable:
            recs.append(rec)
            f1s.append(f1)
    out["balanced_accuracy"] = float(np.nanmean(recs)) if recs else np.nan
    out["macro_f1"] = float(np.nanmean(f1s)) if f1s else np.nan
    out["accuracy"] = float((pred == codes).mean())
    nb = len(BENIGN_SUBTYPES)
    out["binary_accuracy"] = float(((pred >= nb) == (codes >= nb)).mean())
    pt = pd.DataFrame(prob).groupby(patients).mean()
    truth = pd.Series(codes).groupby(patients).agg(lambda s: s.mode().iloc[0])
    out["patient_accuracy"] = float((subtype_calls(pt.to_numpy(), hierarchical) == truth.loc[pt.index].to_numpy()).mean())
    rows = cm.sum(1, keepdims=True)
    for i in range(k):
        for j in range(k):
            out[f"cm/{i}/{j}"] = cm[i, j] / rows[i, 0] if rows[i, 0] else np.nan
    return out


def _bootstrap(codes: np.ndarray, prob: np.ndarray, patients: np.ndarray, testable: list[int], n_boot: int,
               hierarchical: bool, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile CIs resampling patients within their (most frequent) subtype, so every class keeps its count."""
    rng = np.random.default_rng(seed)
    groups = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    strata: dict[int, list] = {}
    for p, idx in groups.items():
        strata.setdefault(int(np.bincount(codes[idx]).argmax()), []).append(p)
    samples: dict[str, list] = {}
    for b in range(n_boot):
        idx, pats = [], []
        for c, ps in strata.items():
            for j, p in enumerate(rng.choice(ps, size=len(ps), replace=True)):
                idx.append(groups[p])
                pats += [f"{p}#{c}_{j}"] * len(groups[p])
        idx = np.concatenate(idx)
        for key, v in subtype_metrics(codes[idx], prob[idx], np.array(pats), testable, hierarchical).items():
            samples.setdefault(key, []).append(v)
    out = {}
    for key, vals in samples.items():
        v = np.asarray(vals, float)
        v = v[np.isfinite(v)]
        out[key] = (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (np.nan, np.nan)
    return out


def _folds(codes: np.ndarray, patients: np.ndarray, k: int, seed: int, leakage: bool) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():  # classes with fewer patients than folds: sklearn warns; we report it instead
        warnings.simplefilter("ignore", UserWarning)
        if not leakage:
            return stratified_group_folds(codes, patients, k, seed)
        fold = np.full(len(codes), -1)
        for i, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(codes)), codes)):
            fold[te] = i
        return fold


def out_of_fold(x: np.ndarray, codes: np.ndarray, patients: np.ndarray, strategy: str, split_seeds=(0, 1, 2),
                k: int = 5, leakage: bool = False) -> np.ndarray:
    """(N, 8) out-of-fold probabilities averaged over split seeds; patient-disjoint folds unless leakage=True."""
    acc = np.zeros((len(split_seeds), len(codes), len(SUBTYPES)))
    for si, seed in enumerate(split_seeds):
        fold = _folds(codes, patients, k, seed, leakage)
        for j in range(k):
            te, tr = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
            if not leakage:
                assert not set(patients[te]) & set(patients[tr]), "subtype folds share a patient"
            acc[si, te] = fit_subtype_model(x[tr], codes[tr], patients[tr], strategy)(x[te])
    return acc.mean(0)


def _report(codes, prob, patients, testable, n_boot, hierarchical: bool) -> dict:
    point = subtype_metrics(codes, prob, patients, testable, hierarchical)
    ci = _bootstrap(codes, prob, patients, testable, n_boot, hierarchical)
    return {key: {"value": None if not np.isfinite(v) else float(v), "ci95": list(ci.get(key, (np.nan, np.nan)))}
            for key, v in point.items()}


def subtype_cv(df: pd.DataFrame, x: np.ndarray, strategies=STRATEGIES, split_seeds=(0, 1, 2), k: int = 5,
               n_boot: int = 500) -> dict:
    """Both strategies, patient-grouped and (labelled leakage) image-wise, with class patient counts."""
    codes = subtype_codes(df)
    patients = df["patient"].astype(str).to_numpy()
    n_pat = {s: int(df.loc[df["subtype"] == s, "patient"].nunique()) for s in SUBTYPES}
    testable = [i for i, s in enumerate(SUBTYPES) if n_pat[s] >= MIN_TEST_PATIENTS]
    out = {"protocol": f"{len(split_seeds)} split seeds x {k} folds stratified by subtype; patient-grouped unless "
                       "marked leakage; frozen ImageNet Lite2 mean native-tile embedding + multinomial logistic "
                       "regression (C=0.05, patient- and class-balanced weights); out-of-fold probabilities averaged "
                       "over split seeds; 95% CIs from resampling patients within their subtype",
           "classes": list(SUBTYPES), "n_patients": n_pat,
           "n_frames": {s: int((df["subtype"] == s).sum()) for s in SUBTYPES},
           "testable": [SUBTYPES[i] for i in testable],
           "not_testable": {SUBTYPES[i]: f"{n_pat[SUBTYPES[i]]} patient(s): too few to test (needs "
                                         f"{MIN_TEST_PATIENTS}); shown, not averaged in"
                            for i in range(len(SUBTYPES)) if i not in testable},
           "n_images": int(len(df)), "patients_total": int(df["patient"].nunique()), "results": {}}
    for strategy in strategies:
        for leakage in (False, True):
            name = f"{strategy}{' (image-wise split: LEAKAGE)' if leakage else ''}"
            log.info("subtype CV: %s", name)
            prob = out_of_fold(x, codes, patients, strategy, split_seeds, k, leakage)
            hier = strategy == "hierarchical"
            out["results"][name] = {"strategy": strategy, "leakage": leakage,
                                    "metrics": _report(codes, prob, patients, testable, n_boot, hier),
                                    "confusion_counts": np.histogram2d(codes, subtype_calls(prob, hier), bins=[
                                        np.arange(len(SUBTYPES) + 1)] * 2)[0].astype(int).tolist()}
    return out


def markdown_tables(res: dict) -> str:
    """README tables from subtype_cv's JSON."""
    def f(m):
        v, (lo, hi) = m["value"], m["ci95"]
        return "—" if v is None else f"{v:.2f} ({lo:.2f}–{hi:.2f})"

    lines = [f"{res['n_images']} frames, {res['patients_total']} patients. Protocol: {res['protocol']}.", "",
             "| strategy | split | balanced accuracy (testable classes) | macro-F1 (testable classes) | 8-class "
             "accuracy | benign/malignant accuracy | patient accuracy |", "|---|---|---|---|---|---|---|"]
    for name, r in res["results"].items():
        m = r["metrics"]
        lines.append(f"| {r['strategy']} | {'image-wise (leakage)' if r['leakage'] else 'patient-grouped'} | "
                     f"{f(m['balanced_accuracy'])} | {f(m['macro_f1'])} | {f(m['accuracy'])} | "
                     f"{f(m['binary_accuracy'])} | {f(m['patient_accuracy'])} |")
    lines += ["", "Per class, patient-grouped (recall and precision with 95% CI; frames / patients):", "",
              "| subtype | patients | frames | " + " | ".join(
                  f"{s} recall | {s} precision" for s in STRATEGIES) + " |",
              "|---|---|---|" + "---|---|" * len(STRATEGIES)]
    for s in res["classes"]:
        cells = []
        for strategy in STRATEGIES:
            m = res["results"][strategy]["metrics"]
            cells += [f(m[f"recall/{s}"]), f(m[f"precision/{s}"])]
        note = "" if s in res["testable"] else " (too few patients to test)"
        lines.append(f"| {s}{note} | {res['n_patients'][s]} | {res['n_frames'][s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
