"""Does the per-frame uncertainty shown on Diagnose carry over to patients it was not measured on? (issue 27)

The page shows, for a frame's p(malignant), the malignant share among out-of-fold frames in the same probability bin
(models.uncertainty). Here the bins are fitted on 4/5 of the patients and read on the held-out fifth, for 5 patient
folds (patients, not frames, held out; stratified by the patient's label): per bin, the held-out frames' malignant
share against the bin's figure and its 95% CI, and against the naive reading (the bin's mean probability). Also
whether any per-frame signal (closeness to the threshold, the seed ensemble's member spread) tells wrong calls from
right ones better than chance: the page shows an uncertainty as validated only where this says so.

    python scripts/frame_uncertainty_check.py [--model magnif_models/all/efficientnet_lite2_ensemble]
        [--out benchmarks/results/frame_uncertainty.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.uncertainty import bin_for, reliability_bins  # noqa: E402


def check(pred: pd.DataFrame, folds: int = 5, seed: int = 0) -> dict:
    """Bins fitted on the other folds' patients, read on each held-out fold's frames."""
    p, y, pats = pred["p_malignant"].to_numpy(float), pred["label"].to_numpy(int), pred["patient"].to_numpy(str)
    rows = []
    for k, (fit, held) in enumerate(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(p, y, pats)):
        bins = reliability_bins(p[fit], y[fit], pats[fit])
        which = np.array([bins.index(bin_for(v, bins)) for v in p[held]])
        for j, b in enumerate(bins):
            m = which == j
            if not m.any():
                continue
            share = float(y[held][m].mean())
            rows.append({"fold": k, "bin": j, "p_lo": b.p_lo, "p_hi": b.p_hi, "bin_share": b.share_malignant,
                         "bin_ci": list(b.ci), "bin_mean_p": float(p[fit][(p[fit] >= b.p_lo) & (p[fit] <= b.p_hi)].mean()),
                         "held_out_share": share, "held_out_frames": int(m.sum()),
                         "held_out_patients": int(len(set(pats[held][m]))), "inside_ci": b.ci[0] <= share <= b.ci[1]})
    r = pd.DataFrame(rows)
    w = r["held_out_frames"].to_numpy(float)
    return {"model_frames": len(pred), "patients": int(len(set(pats))), "folds": folds, "bins": rows,
            "frames_weighted_abs_error_bin_share": float(np.average((r["held_out_share"] - r["bin_share"]).abs(), weights=w)),
            "frames_weighted_abs_error_mean_p": float(np.average((r["held_out_share"] - r["bin_mean_p"]).abs(), weights=w)),
            "share_of_bins_inside_ci": float(r["inside_ci"].mean()),
            "share_of_frames_in_bins_inside_ci": float(np.average(r["inside_ci"], weights=w)),
            "note": ("held-out shares rest on 7-8 patients per fold, so they are noisier than the bins' CIs (which "
                     "describe the bin's own patients): a CI that held 95% of held-out shares would be too wide for "
                     "the bin itself")}


def error_detection(pred: pd.DataFrame, threshold: float, temperature: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Which per-frame signal tells a wrong call from a right one on out-of-fold frames (AUROC for detecting errors,
    patient-bootstrap 95% CI): the distance of p from the threshold (what the referral band uses) and, for a seed
    ensemble, the spread of its members' probabilities (the candidate 'CI from ensemble spread')."""
    from sklearn.metrics import roc_auc_score

    p, y, pats = pred["p_malignant"].to_numpy(float), pred["label"].to_numpy(int), pred["patient"].to_numpy(str)
    err = ((p >= threshold).astype(int) != y).astype(int)
    signals = {"closeness_to_threshold": -np.abs(p - threshold)}
    members = [c for c in pred.columns if c.startswith("logit_member")]
    if len(members) >= 2:
        mp = 1 / (1 + np.exp(-pred[members].to_numpy(float) / temperature))
        signals["ensemble_member_spread"] = mp.std(1)
    rng = np.random.default_rng(seed)
    groups = {g: np.flatnonzero(pats == g) for g in np.unique(pats)}
    keys = list(groups)
    draws = [np.concatenate([groups[keys[i]] for i in rng.integers(0, len(keys), len(keys))]) for _ in range(n_boot)]
    out = {"error_rate": float(err.mean()), "threshold": threshold}
    for name, s in signals.items():
        boot = [roc_auc_score(err[i], s[i]) for i in draws if 0 < err[i].sum() < len(i)]
        auc = float(roc_auc_score(err, s))
        lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
        out[name] = {"auroc_for_errors": auc, "ci95": [lo, hi], "validated": lo > 0.5}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="magnif_models/all/efficientnet_lite2_ensemble", type=Path)
    ap.add_argument("--out", default="benchmarks/results/frame_uncertainty.json", type=Path)
    a = ap.parse_args()
    pred = pd.read_csv(a.model / "predictions.csv", dtype={"patient": str}).dropna(subset=["p_malignant"])
    card = json.loads((a.model / "card.json").read_text())
    from models.archs import file_sha256

    res = {"model": str(a.model), "card_sha256": file_sha256(a.model / "card.json"),
           "command": "python scripts/frame_uncertainty_check.py", **check(pred),
           "error_detection": error_detection(pred, float(card["threshold"]), float(card["temperature"]))}
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{a.model.name}: {res['patients']} patients, {res['model_frames']} out-of-fold frames; held-out malignant "
          f"share vs the bin's figure: mean |error| {res['frames_weighted_abs_error_bin_share']:.3f} (vs the bin's mean "
          f"p: {res['frames_weighted_abs_error_mean_p']:.3f}); held-out share inside the bin's 95% CI for "
          f"{res['share_of_bins_inside_ci']:.0%} of (fold, bin) cells ({res['share_of_frames_in_bins_inside_ci']:.0%} "
          "of frames)")
    for k, v in res["error_detection"].items():
        if isinstance(v, dict):
            print(f"  {k}: AUROC for telling wrong calls from right ones {v['auroc_for_errors']:.2f} "
                  f"(95% CI {v['ci95'][0]:.2f}-{v['ci95'][1]:.2f}): {'validated' if v['validated'] else 'not better than chance'}")


if __name__ == "__main__":
    main()
