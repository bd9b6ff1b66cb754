"""Case mode: the frames of one case judged together (issue 16, part 2).

The case verdict is the mean calibrated probability of the frames the models did not refer, with a 95% CI from
bootstrapping those frames, the share of them called malignant, the frames per magnification and whether the
magnifications agree, the referred frames counted (never silently averaged in), and the few frames that drive
the verdict. A case whose CI straddles the threshold, or with no accepted frame, is referred as a whole.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from models.card import MAGNIFICATIONS

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


@dataclass
class CaseFrame:
    name: str
    magnification: str | None
    model_id: str = ""
    p_malignant: float | None = None
    decision: str = "refer"
    reason: str = ""
    note: str = ""


@dataclass
class CaseVerdict:
    verdict: str  # benign | malignant | refer
    reason: str
    mean_p: float | None
    ci95: tuple[float, float] | None
    share_called_malignant: float | None
    n_frames: int
    n_accepted: int
    n_referred: int
    per_magnification: dict = field(default_factory=dict)
    magnifications_agree: bool | None = None
    drivers: list = field(default_factory=list)
    frames: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def case_verdict(frames: list[CaseFrame], threshold: float = 0.5, n_boot: int = 2000, seed: int = 0,
                 n_drivers: int = 3) -> CaseVerdict:
    """Judge the frames of one case together (see the module docstring)."""
    acc = [f for f in frames if f.decision != "refer" and f.p_malignant is not None]
    n_ref = len(frames) - len(acc)
    base = dict(n_frames=len(frames), n_accepted=len(acc), n_referred=n_ref, frames=[asdict(f) for f in frames])
    if not acc:
        return CaseVerdict("refer", "no frame could be called (every frame was referred)", None, None, None, **base)
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
    if len(acc) == 1:
        verdict, reason = "refer", "a single accepted frame is not a case: no CI can be given"
    elif lo <= threshold <= hi:
        verdict, reason = "refer", (f"the frames disagree: the 95% CI of the mean probability ({lo:.2f}-{hi:.2f}) "
                                    f"contains the threshold {threshold:.2f}")
    else:
        verdict, reason = call, (f"mean p {mean_p:.2f} (95% CI {lo:.2f}-{hi:.2f}) over {len(acc)} accepted frames"
                                 + (f"; {n_ref} referred frame(s) left out" if n_ref else "")
                                 + ("; the magnifications disagree" if agree is False else ""))
        if agree is False:
            verdict, reason = "refer", reason
    return CaseVerdict(verdict, reason, mean_p, (lo, hi), float((p >= threshold).mean()), **base,
                       per_magnification=per_mag, magnifications_agree=agree, drivers=drivers)
