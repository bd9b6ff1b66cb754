"""How often quality control refuses real tissue (issue 25): every QC check on every frame of ../shared/data/breakhis,
per check, per magnification and per patient, the thresholds of the content checks re-derived by their
patient-grouped rule (also leave-one-patient-out), and the generated non-histology corpus that must still be refused.

    python benchmarks/qc_refusals.py [--data ../shared/data/breakhis] [--out benchmarks/results/qc_refusals.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import quality as Q  # noqa: E402
from models.preprocess import ImageError, load_image  # noqa: E402

CHECKS = {"blur": "blur_variance", "tissue": "tissue_fraction", "he_colour": "he_fraction"}
RULE_CHECKS = CHECKS  # every refusing check follows the patient-grouped rule (models.quality.QC_RULE_MARGIN)


def measure(data: Path) -> pd.DataFrame:
    """Every QC measure and verdict of every frame in a manifest folder."""
    man = pd.read_csv(data / "manifest.csv", dtype=str)
    rows = []
    for r in man.to_dict("records"):
        q = Q.check_quality(load_image(data / r["path"]).image, r["magnification"])
        rows.append({"path": r["path"], "patient": r["patient"], "magnification": r["magnification"],
                     "label": r["label"], "blur_variance": q.blur_variance, "tissue_fraction": q.tissue_fraction,
                     "he_fraction": q.he_fraction, "flat_frame_fraction": q.flat_frame_fraction,
                     "fails": ",".join(Q.qc_failures(q)), "not_histology": q.out_of_distribution})
    return pd.DataFrame(rows)


def rule_threshold(values: pd.Series, patients: pd.Series) -> float:
    """The checks' patient-grouped rule: QC_RULE_MARGIN x the lowest per-patient minimum, rounded down to two
    significant digits."""
    x = Q.QC_RULE_MARGIN * float(values.groupby(patients).min().min())
    step = 10.0 ** (np.floor(np.log10(x)) - 1)
    return float(round(np.floor(x / step) * step, 10))


def refusal_table(m: pd.DataFrame) -> dict:
    """Refusals per check (overall, per magnification, worst patient) and by any QC refusal (a check or not-histology)."""
    m = m.assign(any=(m["fails"] != "") | m["not_histology"])
    out = {}
    for name in [*CHECKS, "not_histology", "any"]:
        hit = m["fails"].str.split(",").apply(lambda f: name in f) if name in CHECKS else m[name].astype(bool)
        per_pat = hit.groupby(m["patient"]).mean()
        out[name] = {"frames": int(hit.sum()), "share": float(hit.mean()),
                     "per_magnification": {g: {"frames": int(hit[m["magnification"] == g].sum()),
                                               "of": int((m["magnification"] == g).sum())}
                                           for g in sorted(m["magnification"].unique())},
                     "worst_patient": {"patient": str(per_pat.idxmax()), "share": float(per_pat.max()),
                                       "frames": int(hit[m["patient"] == per_pat.idxmax()].sum()),
                                       "of": int((m["patient"] == per_pat.idxmax()).sum())},
                     "patients_losing_over_a_third": int((per_pat > 1 / 3).sum())}
    return out


def leave_one_patient_out(m: pd.DataFrame) -> dict:
    """Each check's threshold derived without a patient, applied to that patient's frames: the false-refusal
    rate to expect on patients the rule never saw."""
    out = {}
    for name, col in RULE_CHECKS.items():
        refused = 0
        for pat in m["patient"].unique():
            rest = m[m["patient"] != pat]
            t = rule_threshold(rest[col], rest["patient"])
            refused += int((m.loc[m["patient"] == pat, col] < t).sum())
        out[name] = {"frames_refused": refused, "share": refused / len(m),
                     "threshold_all_patients": rule_threshold(m[col], m["patient"])}
    return out


def corpus_refusals(idc: Path | None) -> dict:
    """Generated non-histology images and IDC-scale patches: refused by QC (a check, or not histology), by kind; IDC
    patches as uploaded (50x50: the loader refuses them) and blown up to a frame."""
    from PIL import Image

    from training.refer import idc_patches, ood_corpus

    def refused(img) -> bool:
        q = Q.check_quality(img)
        return bool(Q.qc_failures(q)) or q.out_of_distribution

    gen = ood_corpus()
    kinds = sorted({n.split("-")[1] for n, _ in gen})
    out = {"generated": {k: float(np.mean([refused(im) for n, im in gen if n.split("-")[1] == k])) for k in kinds},
           "n_generated": len(gen)}
    if idc is not None and (idc / "manifest.csv").is_file():
        man = pd.read_csv(idc / "manifest.csv", dtype=str)
        as_uploaded = 0
        for p in man["path"]:
            try:
                load_image(idc / p)
            except ImageError:
                as_uploaded += 1
        blown = idc_patches(idc, n=len(man))
        out["idc_as_uploaded"] = {"refused": as_uploaded / len(man), "n": int(len(man)),
                                  "by": "the loader (smaller than 64 px a side)"}
        out["idc_blown_up_to_a_frame"] = {"refused": float(np.mean([refused(im) for _, im in blown])), "n": len(blown),
                                          "max_blur": float(max(Q.check_quality(im).blur_variance for _, im in blown))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/breakhis")
    ap.add_argument("--idc", default="../shared/data/idc")
    ap.add_argument("--out", default="benchmarks/results/qc_refusals.json")
    a = ap.parse_args()
    m = measure(Path(a.data))
    res = {"thresholds": {"blur": Q.BLUR_VAR_MIN, "tissue": Q.TISSUE_FRACTION_MIN, "he_colour": Q.HE_FRACTION_MIN,
                          "flat_frame": Q.FLAT_FRAME_MAX, "rule_margin": Q.QC_RULE_MARGIN},
           "rule_recomputed": {k: rule_threshold(m[c], m["patient"]) for k, c in RULE_CHECKS.items()},
           "n_frames": int(len(m)), "n_patients": int(m["patient"].nunique()),
           "refusals": refusal_table(m), "leave_one_patient_out": leave_one_patient_out(m),
           "corpus": corpus_refusals(Path(a.idc))}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"| check | threshold | frames refused (of {len(m)}) | 40X | 100X | 200X | 400X | worst patient | patients losing > 1/3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    thr = {**res["thresholds"], "not_histology": "texture / flat / H&E", "any": "any of them"}
    for k, v in res["refusals"].items():
        pm = v["per_magnification"]
        w = v["worst_patient"]
        print(f"| {k} | {thr.get(k)} | {v['frames']} ({v['share']:.1%}) | "
              + " | ".join(f"{pm.get(g, {}).get('frames', 0)}/{pm.get(g, {}).get('of', 0)}" for g in ("40X", "100X", "200X", "400X"))
              + f" | {w['patient']}: {w['frames']}/{w['of']} | {v['patients_losing_over_a_third']} |")
    print("leave-one-patient-out:", json.dumps(res["leave_one_patient_out"]))
    print("rule recomputed:", res["rule_recomputed"], "corpus:", json.dumps(res["corpus"]))


if __name__ == "__main__":
    main()
