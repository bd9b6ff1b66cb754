"""Stain normalisation x TTA table and the cross-magnification matrix, from cards plus one latency run.

For every model folder given: out-of-fold AUC (95% patient-bootstrap CI) per magnification without and with
8-view TTA (both from the same fold models, written by `train --tta-eval`), the stain normalisation it was
trained with, and the median latency of one 700x460 PNG through the predict path without and with TTA
(measured here, in this one run). Then the matrix model x magnification that the registry routes by.

Usage: python scripts/robustness_table.py [--out benchmarks/results/robustness.json] FOLDER...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.card import ALL, MAGNIFICATIONS, ModelCard, metric  # noqa: E402
from models.inference import load_model_folder  # noqa: E402

FRAME = ROOT.parent / "shared" / "data" / "breakhis_frames" / "200X"


def _m(summary: dict | None) -> dict | None:
    """A summary's AUC as JSON ({value, ci95}) for results/robustness.json; None when not measured."""
    m = metric(summary)
    return {"value": m.value, "ci95": list(m.ci95)} if m else None


def ci(m: dict | None) -> str:
    if not m:
        return "not measured"
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.3f} ({lo:.2f}–{hi:.2f})" if v == v else "n/a"


def latency_ms(folder: Path, tta: bool, repeats: int) -> float:
    from models.engine import make_predictor

    pred = make_predictor(load_model_folder(folder), magnification="200X", tta=tta)
    frame = str(sorted(FRAME.glob("*.png"))[0])
    pred.predict([frame])
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.predict([frame])
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-latency", action="store_true")
    args = ap.parse_args()
    rows, seen = [], {}
    for f in args.folders:
        c = ModelCard.from_json(f / "card.json")
        if c.weights_sha256 in seen:  # a candidate that was shipped: same weights, same figures; list it once
            print(f"{f}: same weights as {seen[c.weights_sha256]}, listed once", file=sys.stderr)
            continue
        seen[c.weights_sha256] = f
        where = f.resolve()
        shipped = where.parent.parent.name == "magnif_models"
        row = {"folder": str(f), "model_id": c.model_id if shipped else f"{where.parent.name}/{where.name} (candidate)",
               "shipped": shipped,
               "architecture": c.architecture, "recipe": c.recipe.get("name"),
               "trained_at": c.magnification, "stain": (c.preprocess.stain or {}).get("method", "none"), "auc": {}}
        mags = [ALL] if c.magnification == ALL else [c.magnification]
        mags += [m for m in MAGNIFICATIONS if m not in mags and (m in c.per_magnification or
                                                                  m in c.evaluation.get("cross_magnification", {}))]
        tta = c.evaluation.get("tta") or {}
        for m in mags:
            if m == ALL or m == c.magnification:
                plain, with_tta = c.overall, tta.get("overall")
            else:
                plain, with_tta = c.summaries_at(m)
            row["auc"][m] = {"plain": _m(plain), "tta": _m(with_tta) if with_tta else None,
                             "n_patients": plain["n_patients"],
                             "borrowed": c.magnification not in (ALL, m)}
        qc = c.evaluation.get("qc") or {}
        if qc:
            row["qc"] = {"n_failing": qc["n_failing"], "n_images": qc["n_images"],
                         "auc_all": _m(c.overall), "auc_qc_passed": _m(qc.get("qc_passed_only"))}
        if not args.no_latency:
            row["latency_ms"] = {"plain": latency_ms(f, False, args.repeats), "tta": latency_ms(f, True, args.repeats)}
        rows.append(row)
    # Variants of one model next to each other: trained-at magnification, architecture, shipped first, stain.
    rows.sort(key=lambda r: (r["trained_at"] != ALL, r["trained_at"], r["architecture"], not r["shipped"], r["stain"]))

    print("| model (recipe) | stain | TTA | " + " | ".join(["all", *MAGNIFICATIONS]) + " | ms / image |")
    print("|---|---|---|" + "---|" * (len(MAGNIFICATIONS) + 2))
    for r in rows:
        for mode in ("plain", "tta"):
            cells = []
            for m in ["all", *MAGNIFICATIONS]:
                a = r["auc"].get(m)
                cells.append(ci(a[mode]) + (" *" if a and a["borrowed"] else "") if a else "–")
            lat = r.get("latency_ms", {}).get(mode)
            timing = f"{lat:.0f}" if lat else "not timed"
            print(f"| {r['model_id']} ({r['recipe']}) | {r['stain']} | {'8 views' if mode == 'tta' else 'no'} | "
                  + " | ".join(cells) + f" | {timing} |")
    print("\n* borrowed: a single-magnification model scored on held-out patients' frames at another magnification.")
    print("\nCross-magnification matrix (AUC, 95% CI; patients benign/malignant):\n")
    print("| model | trained at | " + " | ".join(MAGNIFICATIONS) + " |")
    print("|---|---|" + "---|" * len(MAGNIFICATIONS))
    for r in rows:
        cells = []
        for m in MAGNIFICATIONS:
            a = r["auc"].get(m)
            cells.append(f"{ci(a['plain'])} [{a['n_patients']['benign']}/{a['n_patients']['malignant']}]" if a else "–")
        print(f"| {r['model_id']} ({r['stain']}) | {r['trained_at']} | " + " | ".join(cells) + " |")
    print("\nQuality control (out-of-fold, all magnifications of each model's data):\n")
    print("| model | stain | frames failing QC | AUC all frames | AUC QC-passing frames |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "qc" in r:
            q = r["qc"]
            print(f"| {r['model_id']} | {r['stain']} | {q['n_failing']} of {q['n_images']} | {ci(q['auc_all'])} | "
                  f"{ci(q['auc_qc_passed'])} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python scripts/robustness_table.py " + " ".join(map(str, args.folders)),
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
