"""The case as the unit of decision (issue 25): per-magnification temperatures and the case policy, fitted on
out-of-fold predictions grouped by patient and magnification, and validated on patients they were not fitted on.

Cases are simulated from each patient's out-of-fold frames at one magnification: random draws of 1-10 frames (what a
pathologist uploads), plus the case of all its frames. Frames refused by quality control (or the OOD score) do not
count; frames in the frame-level uncertainty band do. `nested_case_evaluation` fits the temperatures and the case
margin on 4/5 of the patients and scores the other 1/5, five times over, so every reported case figure comes from
patients the policy never saw.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd

from models.case import CasePolicy
from models.card import MAGNIFICATIONS
from models.metrics import apply_temperature, fit_temperature_guarded
from training.splits import stratified_group_folds

from models.routing.thresholds import MIN_PATIENTS_PER_CLASS  # a magnification gets its own temperature only with >= 5 out-of-fold patients per class
CASE_SIZES = (1, 2, 3, 4, 6, 8, 10)  # frames per simulated case (a pathologist's upload), plus "all" of a patient's
DRAWS_PER_SIZE = 10
FRAME_CAP = 10  # CasePolicy.frame_cap: margins grow with sqrt(frames) up to 10 frames (frames of one patient correlate)
TARGET_CASE_ACCURACY = 0.85  # the same target as the frame-level band
MIN_COVERAGE = 0.10
MARGIN_GRID = np.round(np.arange(0.0, 1.6, 0.005), 3)
EXPONENTS = (0.0, 0.25, 0.5)  # how fast the margin grows with frames: not at all, fourth root, square root
REPORT_SIZE = 6  # the size of the headline figure (the user test: six frames per case)


def fit_temperatures(logits: np.ndarray, y: np.ndarray, mags: np.ndarray, patients: np.ndarray
                     ) -> tuple[float, dict[str, dict]]:
    """The pooled temperature, and each magnification's own where it has >= MIN_PATIENTS_PER_CLASS patients of each
    class (guarded fit: a fit on a search bound falls back to the pooled value, and the source says so)."""
    pooled, _ = fit_temperature_guarded(logits, y)
    by_mag: dict[str, dict] = {}
    for g in MAGNIFICATIONS:
        m = mags == g
        if not m.any():
            continue
        n = {lab: int(len(set(patients[m & (y == k)]))) for k, lab in ((0, "benign"), (1, "malignant"))}
        if min(n.values()) < MIN_PATIENTS_PER_CLASS:
            continue
        t, note = fit_temperature_guarded(logits[m], y[m])
        if note != "fitted":
            continue
        by_mag[g] = {"temperature": float(t), "n_patients": n,
                     "source": f"fitted on the out-of-fold logits of {n['benign']} benign / {n['malignant']} "
                               f"malignant patients at {g}"}
    return float(pooled), by_mag


def calibrate(logits: np.ndarray, mags: np.ndarray, pooled: float, by_mag: dict[str, dict]) -> np.ndarray:
    """Calibrated p with each frame's magnification temperature (pooled where it has none)."""
    t = np.array([by_mag[g]["temperature"] if g in by_mag else pooled for g in mags], float)
    return apply_temperature(np.asarray(logits, float) / t, 1.0)


def simulate_cases(frames: pd.DataFrame, seed: int = 0, sizes=CASE_SIZES, draws: int = DRAWS_PER_SIZE) -> pd.DataFrame:
    """Cases drawn from each (patient, magnification): `draws` random subsets of each size (no frame twice in a case)
    and one case of all its frames. `frames` needs patient, magnification, y, p, counts; returns one row per case with
    its mean p over the frames that count and their number."""
    rng = np.random.default_rng(seed)
    rows = []
    for (pat, mag), g in frames.groupby(["patient", "magnification"], sort=True):
        p, c, y = g["p"].to_numpy(float), g["counts"].to_numpy(bool), int(g["y"].iloc[0])
        plans = [("all", np.arange(len(g)))]
        for k in sizes:
            if k <= len(g):
                plans += [(k, rng.choice(len(g), k, replace=False)) for _ in range(draws)]
        for size, idx in plans:
            cnt = idx[c[idx]]
            rows.append({"patient": str(pat), "magnification": mag, "y": y, "size": size, "n_counted": len(cnt),
                         "mean_p": float(p[cnt].mean()) if len(cnt) else np.nan,
                         # the older rule (issue 16): frames in the band dropped, CI of the rest must clear 0.5
                         "old_rule": _old_rule(p[cnt], g["band"].to_numpy(bool)[cnt] if "band" in g else None, rng)})
    return pd.DataFrame(rows)


def _old_rule(p: np.ndarray, band: np.ndarray | None, rng: np.random.Generator, threshold: float = 0.5) -> int:
    """The case rule before issue 25, for comparison: band frames dropped, refer with < 2 accepted frames or a bootstrap
    CI containing the threshold. Returns 1 malignant, 0 benign, -1 refer."""
    acc = p[~band] if band is not None else p
    if len(acc) < 2:
        return -1
    boots = acc[rng.integers(0, len(acc), (500, len(acc)))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    if lo <= threshold <= hi:
        return -1
    return int(acc.mean() >= threshold)


def case_outcomes(cases: pd.DataFrame, policy: CasePolicy) -> pd.DataFrame:
    """Whether each case is called under the policy, and whether the call is right."""
    ok = cases["n_counted"] > 0
    margin = np.where(ok, np.abs(cases["mean_p"].fillna(policy.threshold) - policy.threshold)
                      * np.clip(cases["n_counted"], 1, policy.frame_cap).astype(float) ** policy.exponent, 0.0)
    called = ok & (margin >= policy.min_margin)
    right = (cases["mean_p"] >= policy.threshold).astype(int) == cases["y"]
    return cases.assign(margin=margin, called=called, correct=called & right)


def fit_case_policy(cases: pd.DataFrame, target: float = TARGET_CASE_ACCURACY, threshold: float = 0.5,
                    frame_cap: int = FRAME_CAP) -> tuple[CasePolicy, list[dict]]:
    """For each exponent, the smallest margin whose called cases reach `target` accuracy (keeping >= 10% of cases);
    the exponent whose margin calls the most cases wins. Where no margin reaches the target, the margin with the best
    accuracy, and the note says the target was missed. Cases weigh by patient (each patient's cases count as one
    patient), so a patient with 80 frames does not choose the margin."""
    best = None
    for e in EXPONENTS:
        base = case_outcomes(cases, CasePolicy(0.0, frame_cap, threshold, target, exponent=e))
        w = 1.0 / base.groupby("patient")["patient"].transform("size").to_numpy()
        called0, margin, correct = base["called"].to_numpy(), base["margin"].to_numpy(), base["correct"].to_numpy()
        points = []
        for m in MARGIN_GRID:
            called = called0 & (margin >= m)
            cov = float(w[called].sum() / w.sum())
            acc = float((w * correct)[called].sum() / w[called].sum()) if called.any() else float("nan")
            points.append({"min_margin": float(m), "exponent": e, "coverage": cov, "accuracy": acc})
        ok = [r for r in points if r["coverage"] >= MIN_COVERAGE and r["accuracy"] >= target]
        if ok:
            cand = (1, ok[0]["coverage"], ok[0], points,
                    f"smallest margin reaching {target:.0%} accuracy on out-of-fold patients' called cases")
        else:
            r = max((r for r in points if r["coverage"] >= MIN_COVERAGE), key=lambda x: x["accuracy"])
            cand = (0, r["accuracy"], r, points, f"no margin reaches {target:.0%} case accuracy while calling 10% of "
                                                  f"cases; the margin with the best accuracy ({r['accuracy']:.0%}) is used")
        if best is None or cand[:2] > best[:2]:
            best = cand
    _, _, r, points, note = best
    return CasePolicy(r["min_margin"], frame_cap, threshold, target, note, r["exponent"]), points


def _summary(out: pd.DataFrame, rng: np.random.Generator, n_boot: int = 1000) -> dict:
    """Coverage (share of cases called) and accuracy among called cases, each case weighted 1 / its patient's case
    count, with 95% CIs from resampling patients within each label."""
    pats = out.groupby("patient")["y"].first()
    groups = {p: g for p, g in out.groupby("patient")}

    def stats(plist) -> tuple[float, float]:
        d = pd.concat([groups[p] for p in plist])
        w = 1.0 / d.groupby("patient")["patient"].transform("size").to_numpy()
        c = d["called"].to_numpy()
        cov = float(w[c].sum() / w.sum())
        acc = float((w * d["correct"].to_numpy())[c].sum() / w[c].sum()) if c.any() else float("nan")
        return cov, acc

    cov, acc = stats(pats.index)
    boots = []
    by_label = [pats.index[pats == k].to_numpy() for k in (0, 1)]
    for _ in range(n_boot):
        boots.append(stats(np.concatenate([rng.choice(b, len(b)) for b in by_label if len(b)])))
    boots = np.array(boots)
    ci = lambda a: [float(x) for x in np.nanquantile(a, [0.025, 0.975])]  # noqa: E731
    n_called_pat = int(out.groupby("patient")["called"].any().sum())
    return {"coverage": {"value": cov, "ci95": ci(boots[:, 0])}, "accuracy": {"value": acc, "ci95": ci(boots[:, 1])},
            "n_cases": int(len(out)), "n_patients": {"benign": int((pats == 0).sum()), "malignant": int((pats == 1).sum())},
            "n_patients_with_a_called_case": n_called_pat}


def nested_case_evaluation(frames: pd.DataFrame, k: int = 5, seed: int = 0, n_boot: int = 1000) -> dict:
    """Temperatures, frame band and case margin fitted on k-1 folds of patients, scored on the held-out fold; pooled
    over the k outer folds. `frames`: patient, magnification, y, logit, qc_ok (+ ood_ok), one row per out-of-fold frame.

    Reported per case size (REPORT_SIZE frames, and all of a patient's frames at a magnification): coverage and
    accuracy of the new case rule, of the older rule (band frames dropped, CI must clear the threshold) and of the
    frame-level band on the same held-out patients' frames."""
    from training.refer import choose_band, risk_coverage

    frames = frames.reset_index(drop=True)
    y, pats = frames["y"].to_numpy(int), frames["patient"].astype(str).to_numpy()
    counts = frames["qc_ok"].to_numpy(bool) & frames.get("ood_ok", pd.Series(True, index=frames.index)).to_numpy(bool)
    fold = stratified_group_folds(y, pats, k, seed)
    outs, frame_rows, margins, temps = [], [], [], []
    for f in range(fold.max() + 1):
        tr, te = fold != f, fold == f
        pooled, by_mag = fit_temperatures(frames["logit"].to_numpy()[tr], y[tr], frames["magnification"].to_numpy()[tr],
                                          pats[tr])
        p = calibrate(frames["logit"].to_numpy(), frames["magnification"].to_numpy(), pooled, by_mag)
        band, _, _ = choose_band(risk_coverage(y[tr & counts], p[tr & counts], 0.5, np.round(np.arange(0, 0.5, 0.01), 3)),
                                 TARGET_CASE_ACCURACY, 0.5)
        in_band = (p >= band[0]) & (p <= band[1])
        fr = frames.assign(p=p, counts=counts, band=in_band, y=y, patient=pats)
        inner_cases = simulate_cases(fr[tr], seed=seed + f)
        policy, _ = fit_case_policy(inner_cases)
        outer = case_outcomes(simulate_cases(fr[te], seed=seed + 100 + f), policy)
        outer["fold"] = f
        outs.append(outer)
        called_frames = te & counts & ~in_band
        frame_rows.append(pd.DataFrame({"patient": pats[te & counts], "y": y[te & counts], "size": 1,
                                        "called": called_frames[te & counts],
                                        "correct": called_frames[te & counts] & ((p[te & counts] >= 0.5) == y[te & counts])}))
        margins.append(policy.min_margin)
        temps.append({"pooled": pooled, **{g: v["temperature"] for g, v in by_mag.items()}, "band": list(band)})
    out = pd.concat(outs, ignore_index=True)
    rng = np.random.default_rng(seed)
    old = out.assign(called=out["old_rule"] >= 0, correct=(out["old_rule"] >= 0) & (out["old_rule"] == out["y"]))
    report = {}
    for size in (REPORT_SIZE, "all"):
        sel = out["size"].astype(str) == str(size)
        report[str(size)] = {"case_policy": _summary(out[sel], rng, n_boot),
                             "old_rule": _summary(old[sel], rng, n_boot)}
    by_size = {}
    for size in [*CASE_SIZES, "all"]:
        sel = out["size"].astype(str) == str(size)
        if sel.any():
            d = out[sel]
            w = 1.0 / d.groupby("patient")["patient"].transform("size")
            c = d["called"].to_numpy()
            by_size[str(size)] = {"coverage": float(w[c].sum() / w.sum()),
                                  "accuracy": float((w * d["correct"])[c].sum() / w[c].sum()) if c.any() else None,
                                  "old_rule_coverage": float(w[old[sel]["called"].to_numpy()].sum() / w.sum())}
    report["frames"] = _summary(pd.concat(frame_rows, ignore_index=True), rng, n_boot)
    return {"protocol": (f"{k} outer folds of patients (stratified, grouped); per-magnification temperatures, the "
                         "frame-level band and the case margin fitted on the other folds' out-of-fold predictions, "
                         "scored on the held-out patients only; cases drawn from each held-out patient's frames at one "
                         f"magnification ({DRAWS_PER_SIZE} draws of each of {list(CASE_SIZES)} frames, plus all its "
                         "frames); coverage and accuracy weigh each patient equally; 95% CIs resample patients within "
                         "each label"),
            "by_size": report, "coverage_by_case_size": by_size, "outer_margins": margins, "outer_calibration": temps}


def case_policy_for(frames: pd.DataFrame, pooled: float, by_mag: dict, seed: int = 0) -> tuple[CasePolicy, list[dict]]:
    """The shipped case policy: every out-of-fold patient's cases, calibrated as the card serves them."""
    y = frames["y"].to_numpy(int)
    counts = frames["qc_ok"].to_numpy(bool) & frames.get("ood_ok", pd.Series(True, index=frames.index)).to_numpy(bool)
    p = calibrate(frames["logit"].to_numpy(), frames["magnification"].to_numpy(), pooled, by_mag)
    fr = frames.assign(p=p, counts=counts, y=y, patient=frames["patient"].astype(str))
    return fit_case_policy(simulate_cases(fr, seed=seed))


def policy_dict(policy: CasePolicy, points: list[dict], nested: dict) -> dict:
    """What refer.json stores under `case_policy`."""
    return {**asdict(policy), "risk_coverage": points, "nested": nested}


def served_model_gap(frames: pd.DataFrame, feats: np.ndarray, k: int = 5, seed: int = 0, n_boot: int = 1000) -> dict:
    """What fitting the calibration and case policy on fold models' out-of-fold logits does when they are applied to a
    model trained on every patient, measured with the one recipe cheap enough to nest (frozen Lite2 features +
    logistic regression, models.engine.fit_logistic_head): in each outer fold, the policy is fitted on the inner
    folds' out-of-fold logits of the outer-training patients (as shipped: fold models), then applied (a) to the outer
    patients' logits of a model refitted on all outer-training patients (as served) and (b) to their out-of-fold
    logits of inner-fold-sized models (what the policy was fitted on). The gap between (a) and (b) is the effect."""
    from training.engine import fit_logistic_head, sample_weights

    frames = frames.reset_index(drop=True)
    y, pats = frames["y"].to_numpy(int), frames["patient"].astype(str).to_numpy()
    mags = frames["magnification"].to_numpy()
    counts = frames["qc_ok"].to_numpy(bool)
    w = sample_weights(y, pats)
    outer = stratified_group_folds(y, pats, k, seed)
    served_out, fold_out, scale = [], [], []
    for o in range(k):
        tr, te = np.flatnonzero(outer != o), np.flatnonzero(outer == o)
        inner = stratified_group_folds(y[tr], pats[tr], k, seed + 1)
        z_inner = np.zeros(len(tr))
        z_te_folds = np.zeros((k, len(te)))
        for i in range(k):
            fit_idx = tr[inner != i]
            wt, b = fit_logistic_head(feats, y, w, fit_idx)
            z_inner[inner == i] = feats[tr[inner == i]] @ wt + b
            z_te_folds[i] = feats[te] @ wt + b  # an inner-fold-sized model on the outer patients
        wt, b = fit_logistic_head(feats, y, w, tr)
        z_served = feats[te] @ wt + b
        scale.append({"fold": o, "sd_inner_oof": float(z_inner.std()), "sd_served_on_outer": float(z_served.std()),
                      "sd_fold_models_on_outer": float(z_te_folds.std(1).mean())})
        pooled, by_mag = fit_temperatures(z_inner, y[tr], mags[tr], pats[tr])
        fr_tr = frames.iloc[tr].assign(logit=z_inner)
        policy, _ = case_policy_for(fr_tr, pooled, by_mag, seed)
        for z, sink in ((z_served, served_out), (z_te_folds[o % k], fold_out)):
            p = calibrate(z, mags[te], pooled, by_mag)
            fr = frames.iloc[te].assign(p=p, counts=counts[te], y=y[te], patient=pats[te])
            sink.append(case_outcomes(simulate_cases(fr, seed=seed + 100 + o), policy))
    rng = np.random.default_rng(seed)
    out = {"protocol": served_model_gap.__doc__.split("\n\n")[0].replace("\n    ", " "), "logit_scale": scale}
    for name, parts in (("served_model", served_out), ("fold_model", fold_out)):
        d = pd.concat(parts, ignore_index=True)
        out[name] = {str(size): _summary(d[d["size"].astype(str) == str(size)], rng, n_boot) for size in (REPORT_SIZE, "all")}
    return out
