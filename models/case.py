"""Case mode: the frames of one case judged together (issue 16, part 2).

The case is the unit of decision (issue 25). The case verdict is the mean calibrated probability of the frames that
count (called, or referred by the frame-level uncertainty band: they still carry signal), with a 95% CI from
bootstrapping them, the share called malignant, the frames per magnification and whether they agree, the refused
frames (quality control, out of distribution, unreadable) counted and left out, and the frames that drive the
verdict. A case is referred when the model's case policy (CasePolicy, fitted on out-of-fold patients' cases by
`python -m training fit-refer`) finds its mean too close to the threshold for its number of frames.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from models.card import MAGNIFICATIONS
from models.refer import EVIDENCE_KINDS

# BreakHis names carry the objective: SOB_B_A-14-22549AB-40-001.png -> 40X
_BREAKHIS_MAG = re.compile(r"^SOB_[BM]_[A-Z]+-\d+-[0-9A-Z]+-(?P<mag>40|100|200|400)-\d+$")


def magnification_from_name(name: str) -> str | None:
    """The magnification a BreakHis-style file name states, or None."""
    m = _BREAKHIS_MAG.match(Path(name).stem)
    return f"{m['mag']}X" if m else None


def resolve_magnification(name: str, chosen: str | None) -> tuple[str | None, str]:
    """(magnification, note): the file name's when it states one, else the chosen one; a note when they disagree."""
    named = magnification_from_name(name)
    if named and chosen and named != chosen:
        return named, f"the file name says {named} but {chosen} was chosen: analysed at {named}, as the name states"
    if named:
        return named, ""
    if chosen in MAGNIFICATIONS:
        return chosen, ""
    return None, "no magnification: choose one, or use BreakHis-style file names"


@dataclass(frozen=True)
class CasePolicy:
    """When a case is too uncertain to call: its margin, |mean p - threshold| x min(n, frame_cap) ** exponent over the
    n frames that count, is below `min_margin`. An exponent of 0.5 lets more frames pin the mean down as a standard
    error would; frames of one patient are correlated, so the exponent (0 to 0.5) and the margin are fitted together
    on out-of-fold patients' cases (training.case_policy) to reach `target_accuracy` among called cases, and the cap
    stops a case of 80 frames of one patient from looking far surer than one of 10."""

    min_margin: float
    frame_cap: int = 10
    threshold: float = 0.5
    target_accuracy: float = 0.85
    note: str = ""
    exponent: float = 0.5

    def margin(self, mean_p: float, n: int) -> float:
        return abs(mean_p - self.threshold) * float(min(max(n, 1), self.frame_cap) ** self.exponent)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CasePolicy | None":
        """The policy stored in refer.json's `case_policy`, or None when none was fitted; checked before use."""
        if not d:
            return None
        pol = cls(**{k: d[k] for k in ("min_margin", "frame_cap", "threshold", "target_accuracy", "note", "exponent")
                     if k in d})
        if not (0.0 <= pol.min_margin <= 2.0 and 1 <= pol.frame_cap <= 1000 and 0.0 < pol.threshold < 1.0
                and 0.0 <= pol.exponent <= 1.0):
            raise ValueError(f"case policy out of range: {pol}")
        return pol


@dataclass
class CaseFrame:
    name: str
    magnification: str | None
    model_id: str = ""
    p_malignant: float | None = None
    decision: str = "refer"
    reason: str = ""
    note: str = ""
    kind: str = ""  # models.refer.DECISION_KINDS; "" (older callers): a frame counts only when it was called
    content_sha256: str = ""  # of the decoded pixels: the same frame under another name is one piece of evidence
    duplicate_of: str = ""  # set by case_verdict: the earlier frame with the same pixels

    @property
    def counts(self) -> bool:
        """Whether this frame is evidence for the case: called, or referred only as uncertain (band), and not a copy of
        a frame already counted."""
        if self.p_malignant is None or self.duplicate_of:
            return False
        return self.kind in EVIDENCE_KINDS if self.kind else self.decision != "refer"


@dataclass
class CaseVerdict:
    verdict: str  # benign | malignant | refer
    reason: str
    mean_p: float | None
    ci95: tuple[float, float] | None
    share_called_malignant: float | None
    n_frames: int
    n_accepted: int  # frames that count toward the case (called or in the uncertainty band)
    n_referred: int  # frames left out (refused by QC, the OOD score or the decoder)
    n_band: int = 0  # counted frames that the frame-level rule referred as uncertain
    margin: float | None = None
    policy: dict | None = None
    per_magnification: dict = field(default_factory=dict)
    magnifications_agree: bool | None = None
    drivers: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)  # {"name", "duplicate_of"}: frames left out as copies

    def to_dict(self) -> dict:
        return asdict(self)


def case_verdict(frames: list[CaseFrame], threshold: float = 0.5, n_boot: int = 2000, seed: int = 0,
                 n_drivers: int = 3, policy: CasePolicy | None = None) -> CaseVerdict:
    """Judge the frames of one case together (see the module docstring).

    Every frame with a probability that was not refused counts (a frame in the frame-level uncertainty band is
    weak evidence, not none); with a case policy the case is called when its margin clears the fitted bound. Without
    one, the older rule applies (and the reason says so): refer when the bootstrap CI contains the threshold."""
    seen: dict[str, str] = {}
    duplicates = []
    for f in frames:  # evidence by content: one frame uploaded five times (or renamed) counts once
        f.duplicate_of = ""
        if f.content_sha256 and f.counts:
            if f.content_sha256 in seen:
                f.duplicate_of = seen[f.content_sha256]
                duplicates.append({"name": f.name, "duplicate_of": f.duplicate_of})
            else:
                seen[f.content_sha256] = f.name
    acc = [f for f in frames if f.counts]
    n_ref = len(frames) - len(acc) - len(duplicates)
    n_band = sum(1 for f in acc if f.decision == "refer")
    if policy is not None:
        threshold = policy.threshold
    base = dict(n_frames=len(frames), n_accepted=len(acc), n_referred=n_ref, n_band=n_band,
                policy=asdict(policy) if policy else None, frames=[asdict(f) | {"counts": f.counts} for f in frames],
                duplicates=duplicates)
    if not acc:
        return CaseVerdict("refer", "no frame counts: every frame was refused (quality control, out of distribution "
                                    "or unreadable)", None, None, None, **base)
    p = np.array([f.p_malignant for f in acc])
    rng = np.random.default_rng(seed)
    boots = p[rng.integers(0, len(p), (n_boot, len(p)))].mean(1)
    lo, hi = (float(x) for x in np.quantile(boots, [0.025, 0.975]))
    mean_p = float(p.mean())
    per_mag = {}
    for g in sorted({f.magnification for f in acc}, key=lambda m: MAGNIFICATIONS.index(m) if m in MAGNIFICATIONS else 9):
        pg = np.array([f.p_malignant for f in acc if f.magnification == g])
        per_mag[g] = {"frames": int(len(pg)), "mean_p": float(pg.mean()),
                      "call": "malignant" if pg.mean() >= threshold else "benign"}
    agree = len({v["call"] for v in per_mag.values()}) == 1 if len(per_mag) > 1 else None
    call = "malignant" if mean_p >= threshold else "benign"
    order = np.argsort(-p if call == "malignant" else p)[:n_drivers]
    drivers = [{"name": acc[i].name, "p_malignant": float(p[i]), "magnification": acc[i].magnification} for i in order]
    counted = (f"{len(acc)} frame(s) counted" + (f" ({n_band} of them in the frame-level uncertainty band)" if n_band else "")
               + (f"; {n_ref} refused frame(s) left out" if n_ref else ""))
    margin = policy.margin(mean_p, len(acc)) if policy else None
    if policy is not None:
        if margin >= policy.min_margin:
            verdict, reason = call, (f"mean p {mean_p:.2f} over {counted}: margin {margin:.2f} clears the case "
                                     f"policy's {policy.min_margin:.2f} (fitted on out-of-fold patients for "
                                     f"{policy.target_accuracy:.0%} case accuracy)")
        else:
            verdict, reason = "refer", (f"too uncertain for a case of {len(acc)} frame(s): mean p {mean_p:.2f}, margin "
                                        f"{margin:.2f} below the case policy's {policy.min_margin:.2f} ({counted})")
    elif len(acc) == 1:
        verdict, reason = "refer", "a single frame and no case policy fitted for this model: no CI can be given"
    elif lo <= threshold <= hi:
        verdict, reason = "refer", (f"the frames disagree: the 95% CI of the mean probability ({lo:.2f}-{hi:.2f}) "
                                    f"contains the threshold {threshold:.2f} (no case policy fitted for this model)")
    else:
        verdict, reason = call, (f"mean p {mean_p:.2f} (95% CI {lo:.2f}-{hi:.2f}) over {counted} (no case policy "
                                 "fitted for this model: CI rule)")
    if agree is False and verdict != "refer":
        verdict, reason = "refer", reason + "; the magnifications disagree"
    if duplicates:  # said whatever the verdict: the copies were not counted
        reason += f"; {len(duplicates)} duplicate frame(s) left out (same pixels as a counted frame)"
    return CaseVerdict(verdict, reason, mean_p, (lo, hi), float((p >= threshold).mean()), **base, margin=margin,
                       per_magnification=per_mag, magnifications_agree=agree, drivers=drivers)
