"""Each frame's uncertainty, as the evidence can back it: how often out-of-fold frames scored like it were malignant.

A calibrated probability says 0.42; a pathologist also needs to know how firm that is. We show, beside every frame's
p(malignant), the share of malignant frames among the model's out-of-fold frames (patients the model never saw)
whose probability fell in the same bin, with a patient-bootstrap 95% CI and the counts behind it, and where the frame
sits relative to the referral band. That statement is measured, not modelled; the seed ensemble's member spread
(3 members) is too few draws to give a validated interval, so it is not shown as one. How well a bin's figure carries
over to new patients is checked by `python scripts/frame_uncertainty_check.py` (bins fitted on 4/5 of the patients,
read on the held-out fifth).

The bins are equal-count (quantiles of the out-of-fold probabilities) so each holds enough frames; the bootstrap
resamples patients, not frames, because frames of one patient are alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

N_BINS = 6
N_BOOT = 1000


@dataclass(frozen=True)
class ReliabilityBin:
    """Out-of-fold frames whose calibrated p fell in [p_lo, p_hi): the malignant share among them, with its CI."""

    p_lo: float
    p_hi: float
    share_malignant: float
    ci: tuple[float, float]
    n_frames: int
    n_patients: int


def reliability_bins(p: np.ndarray, labels: np.ndarray, patients: np.ndarray, n_bins: int = N_BINS,
                     n_boot: int = N_BOOT, seed: int = 0) -> list[ReliabilityBin]:
    """Equal-count bins of out-of-fold probabilities, each with its malignant share and a patient-bootstrap 95% CI."""
    p, y, pats = np.asarray(p, float), np.asarray(labels, int), np.asarray(patients).astype(str)
    keep = np.isfinite(p)
    p, y, pats = p[keep], y[keep], pats[keep]
    if len(p) < n_bins:
        return []
    inner = np.quantile(p, np.linspace(0, 1, n_bins + 1))[1:-1]
    edges = np.unique(np.concatenate([[0.0], inner[(inner > 0) & (inner < 1)], [1.0]]))
    rng = np.random.default_rng(seed)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & ((p < hi) if hi < 1.0 else (p <= hi))
        if not m.any():
            continue
        yb, pb = y[m], pats[m]
        groups = [yb[pb == g] for g in np.unique(pb)]
        sums = np.array([g.sum() for g in groups], float)
        counts = np.array([len(g) for g in groups], float)
        draws = rng.integers(0, len(groups), size=(n_boot, len(groups)))  # patients resampled with replacement
        boot = sums[draws].sum(1) / counts[draws].sum(1)
        out.append(ReliabilityBin(float(lo), float(hi), float(yb.mean()),
                                  (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))),
                                  int(m.sum()), len(groups)))
    return out


def bins_from_predictions(path: str | Path, n_bins: int = N_BINS) -> list[ReliabilityBin]:
    """The bins of a model folder's out-of-fold predictions.csv ([] when it has none): its `p_malignant` column is
    cross-fitted (each fold's probabilities calibrated by a temperature fitted on the other folds)."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        return []
    pred = pd.read_csv(path, dtype={"patient": str}).dropna(subset=["p_malignant"])
    if "part" in pred:  # out-of-fold rows only (a held-out test split, where one exists, is read the same way)
        pred = pred[pred["part"].isin(["train", "test"])]
    return reliability_bins(pred["p_malignant"].to_numpy(float), pred["label"].to_numpy(int),
                            pred["patient"].to_numpy(str), n_bins)


def bin_for(p: float, bins: list[ReliabilityBin]) -> ReliabilityBin | None:
    """The bin a probability falls in (None without bins or for a missing p)."""
    if p is None or not np.isfinite(p) or not bins:
        return None
    for b in bins:
        if b.p_lo <= p < b.p_hi:
            return b
    return bins[-1] if p >= bins[-1].p_lo else bins[0]


def band_position(p: float, band: tuple[float, float] | None) -> str:
    """Where a probability sits relative to the referral band, in words."""
    if p is None or not np.isfinite(p):
        return ""
    if band is None:
        return "no referral band is fitted for this model"
    lo, hi = band
    if lo <= p <= hi:
        return f"inside the referral band ({lo:.2f}-{hi:.2f}): too close to call on its own"
    if p < lo:
        return f"{lo - p:.2f} below the referral band ({lo:.2f}-{hi:.2f})"
    return f"{p - hi:.2f} above the referral band ({lo:.2f}-{hi:.2f})"


def uncertainty_line(p: float, bins: list[ReliabilityBin], band: tuple[float, float] | None,
                     with_band_position: bool = True) -> str:
    """One sentence a pathologist can weigh: the band position (unless the page already said it) and what happened
    to out-of-fold frames like it."""
    b = bin_for(p, bins)
    where = band_position(p, band) if with_band_position else ""
    if b is None:
        return (where[:1].upper() + where[1:] + ". " if where else "") + "No out-of-fold predictions to say how " \
            "often frames scored like this were malignant."
    return ((f"{where[:1].upper() + where[1:]}. " if where else "") + f"Of the out-of-fold frames this model scored {b.p_lo:.2f}-{b.p_hi:.2f} "
            f"(patients it never saw: {b.n_frames} frames of {b.n_patients} patients), {b.share_malignant:.0%} were "
            f"malignant (95% CI {b.ci[0]:.0%}-{b.ci[1]:.0%}).")


def short_uncertainty(p: float, bins: list[ReliabilityBin]) -> str:
    """The same in a table cell: 'malignant in 41% (28-57%) of 92 similar out-of-fold frames'."""
    b = bin_for(p, bins)
    if b is None:
        return ""
    return (f"malignant in {b.share_malignant:.0%} ({b.ci[0]:.0%}-{b.ci[1]:.0%}) of {b.n_frames} similar "
            "out-of-fold frames")
