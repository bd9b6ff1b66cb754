"""README tables for issue 18 from files the repo's commands wrote (nothing typed by hand).

    python scripts/generalisation_table.py [--frozen benchmarks/results/frozen_cv.json] [MODEL_DIR ...]

1. Repeated CV of the frozen-feature recipes (`python -m training frozen-cv`): per-fold AUC mean +- SD over
   seeds x folds, pooled AUC per split seed, and on the seed-averaged out-of-fold logits the frame AUC,
   patient AUC and patient accuracy with patient-bootstrap CIs, and the paired difference to whole-frame LR.
2. Every model folder given (default: magnif_models/*/*): its own CV run (one split seed), the same columns.
3. --compare A B [--out JSON]: two model folders cross-validated on identical folds (e.g. with and without
   colour augmentation): the paired patient-bootstrap AUC difference A - B, frame-level, patient-level
   (patient = mean of its frames) and per magnification.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.card import ModelCard, metric  # noqa: E402
from models.folders import list_model_folders  # noqa: E402


def ci(m: dict) -> str:
    return f"{m['value']:.3f} ({m['ci95'][0]:.2f}–{m['ci95'][1]:.2f})"


def _d(m) -> dict:
    return {"value": m.value, "ci95": list(m.ci95)}


def compare(a: Path, b: Path, n_boot: int = 2000) -> dict:
    """Paired comparison of two models' out-of-fold predictions on the same frames and folds."""
    import pandas as pd

    from models.metrics import paired_auc_difference

    pa, pb = (pd.read_csv(f / "predictions.csv", dtype={"patient": str}).set_index("path") for f in (a, b))
    pb = pb.loc[pa.index]
    if not (pa["cv_fold"] == pb["cv_fold"]).all():
        raise SystemExit(f"error: {a} and {b} were not cross-validated on the same folds")
    y, pats = pa["label"].to_numpy(int), pa["patient"].to_numpy()
    out = {"a": str(a), "b": str(b), "n_images": int(len(pa)),
           "n_patients": {"benign": int(pa.loc[y == 0, "patient"].nunique()),
                          "malignant": int(pa.loc[y == 1, "patient"].nunique())},
           "frame": paired_auc_difference(y, pa["logit"], pb["logit"], pats, n_boot=n_boot)}
    pp = pd.DataFrame({"y": y, "a": pa["p_malignant"].to_numpy(), "b": pb["p_malignant"].to_numpy(),
                       "pat": pats}).groupby("pat").mean()
    out["patient"] = paired_auc_difference(pp["y"].to_numpy(int), pp["a"], pp["b"], pp.index.to_numpy(), n_boot=n_boot)
    out["per_magnification"] = {}
    for g, d in pa.groupby("magnification"):
        r = pa.index.get_indexer(d.index)
        out["per_magnification"][g] = paired_auc_difference(y[r], pa["logit"].to_numpy()[r], pb["logit"].to_numpy()[r],
                                                            pats[r], n_boot=n_boot)
    for k, f in (("a_card", a), ("b_card", b)):
        c = ModelCard.from_json(f / "card.json")
        out[k] = {"model_id": c.model_id, "colour_augmentation": c.hyperparameters.get("colour_augmentation"),
                  "auc": _d(metric(c.overall)), "patient_auc": _d(metric(c.overall, "patient_auc")),
                  "per_fold_auc": [x["auc"] for x in c.evaluation.get("per_fold", [])],
                  "training_time_min": round(c.training_time_s / 60)}
    return out


def compare_table(r: dict) -> str:
    def diff(d: dict) -> str:
        return (f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d.get("difference") is not None
                else "n/a")
    n = r["n_patients"]
    lines = [f"{r['n_images']} frames, {n['benign']} benign / {n['malignant']} malignant patients, identical folds.", "",
             "| model | colour augmentation | frame AUC (95% CI) | patient AUC (95% CI) | per-fold AUC mean ± SD | training time |",
             "|---|---|---|---|---|---|"]
    for k in ("a_card", "b_card"):
        c = r[k]
        fa = np.array(c["per_fold_auc"], float)
        lines.append(f"| {c['model_id']} | {c['colour_augmentation'] or 'none (frozen features)'} | {ci(c['auc'])} | {ci(c['patient_auc'])} | "
                     f"{np.nanmean(fa):.3f} ± {np.nanstd(fa, ddof=1):.3f} | {c['training_time_min']} min |")
    lines += ["", f"Paired difference (first minus second), patient-bootstrap 95% CI: frame AUC {diff(r['frame'])}; "
                  f"patient AUC {diff(r['patient'])}; "
              + "; ".join(f"{g} {diff(d)}" for g, d in r["per_magnification"].items()) + "."]
    return "\n".join(lines)


def frozen_table(res: dict) -> str:
    n = res["n_patients"]
    lines = [f"Protocol: {res['protocol']}; {res['n_images']} frames, {n['benign']} benign / {n['malignant']} "
             f"malignant patients. Command: `{res.get('command', 'python -m training frozen-cv')}`", "",
             "| recipe | per-fold AUC mean ± SD (min–max) | pooled AUC by split seed | frame AUC (95% CI) | patient AUC (95% CI) "
             "| patient accuracy (95% CI) | Δ AUC vs whole-frame LR (paired 95% CI) |", "|---|---|---|---|---|---|---|"]
    for r, v in res["recipes"].items():
        s = v["summary"]
        d = v["vs_whole_lr"]
        lines.append(f"| {r} | {v['per_fold_auc_mean']:.3f} ± {v['per_fold_auc_sd']:.3f} ({v['per_fold_auc_min']:.2f}–"
                     f"{v['per_fold_auc_max']:.2f}) | {', '.join(f'{a:.3f}' for a in v['pooled_auc_by_seed'])} | "
                     f"{ci(s['auc'])} | {ci(s['patient_auc'])} | {ci(s['patient_accuracy'])} | "
                     + (f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d else "—") + " |")
    return "\n".join(lines)


def repeats_table(results: list[dict]) -> str:
    """Trained recipes under rule 1 (`python -m training repeats-cv`), beside the frozen references on the same folds."""
    lines = ["| recipe | runs (split seeds) | per-fold AUC mean ± SD (min–max) | pooled AUC by split seed | frame AUC (95% CI) | "
             "patient AUC (95% CI) | patient accuracy (95% CI) | Δ vs whole-frame LR | Δ vs mean-tile LR | "
             "Δ vs the routed recipe | temperature fallbacks | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def d(x):
        return f"{x['difference']:+.3f} ({x['ci95'][0]:+.3f} to {x['ci95'][1]:+.3f})" if x else "—"

    def row(name, seeds, v, vs_w, vs_t, fb, mins, vs_i=None):
        s = v["summary"]
        return (f"| {name} | {seeds} | {v['per_fold_auc_mean']:.3f} ± {v['per_fold_auc_sd']:.3f} ({v['per_fold_auc_min']:.2f}–"
                f"{v['per_fold_auc_max']:.2f}) | {', '.join(f'{a:.3f}' for a in v['pooled_auc_by_seed'])} | {ci(s['auc'])} | "
                f"{ci(s['patient_auc'])} | {ci(s['patient_accuracy'])} | {d(vs_w)} | {d(vs_t)} | {d(vs_i)} | {fb} | {mins} |")
    for res in results:
        r = res["recipe"]
        seeds = ", ".join(map(str, res["seeds"]))
        lines.append(row(res["model_id"], seeds, r, r["vs_whole_lr"],
                         r["vs_tiles_mean_lr"], res["folds_with_temperature_fallback"],
                         ", ".join(f"{m:.0f}" for m in res["training_minutes_per_run"]), r.get("vs_incumbent")))
    if results:
        for n, v in results[0]["references"].items():
            lines.append(row(f"{n} (frozen Lite2, reference)", ", ".join(map(str, results[0]["seeds"])), v, None, None,
                             "—", "< 1"))
    for res in results:
        for ss, t in res.get("training_seed_spread", {}).items():
            lines.append("")
            lines.append(f"Training seeds on split seed {ss}'s folds ({res['model_id']}): pooled out-of-fold AUC "
                         + ", ".join(f"{a:.3f} (training seed {ts})" for a, ts in zip(t["pooled_auc"], t["train_seeds"]))
                         + f"; SD {t['sd']:.3f}, range {t['range']:.3f}; per-fold AUC mean by run "
                         + ", ".join(f"{a:.3f}" for a in t["per_fold_auc_mean"])
                         + f"; temperature fallbacks by run {', '.join(map(str, t['temperature_fallbacks']))}; the "
                         f"{len(t['train_seeds'])} runs' mean logit "
                         + ("(this split seed's ensemble, summarised in the row above)" if res.get("seed_ensemble")
                            else "(an ensemble, not in the row above)") + f" {t['ensemble_auc']:.3f}.")
    n = results[0]["recipe"]["n_patients"] if results else {}
    return "\n".join([f"{results[0]['n_images']} frames, {n.get('benign')} benign / {n.get('malignant')} malignant "
                      f"patients. Protocol: {results[0]['protocol']}.", ""] + lines) if results else ""


def rule1_candidates_table(folders: list[Path]) -> str:
    """Every shipped malignancy model beside its recipe's rule-1 figure (each folder's evidence.json, models.evidence)."""
    from app.dashboard import rule1_summary

    lines = ["| shipped model | its single run: frame AUC | rule 1: frame AUC over 3 split seeds (95% CI) | "
             "patient AUC (95% CI) | per-fold AUC mean ± SD | pooled AUC by split seed | source |",
             "|---|---|---|---|---|---|---|"]
    for f in folders:
        c = ModelCard.from_json(f / "card.json")
        if c.task_kind != "malignancy":
            continue
        r = rule1_summary(c.model_id)
        one = metric(c.overall)
        if r is None:
            lines.append(f"| {c.model_id} | {one.value:.3f} | not measured | | | | |")
            continue
        lines.append(f"| {c.model_id} | {one.value:.3f} | {ci(_d(r['auc']))} | {ci(_d(r['patient_auc']))} | "
                     f"{r['per_fold']} | {', '.join(f'{a:.3f}' for a in r['pooled_auc_by_seed'])} | {r['source']}"
                     + (f" ({r['shortfall']})" if r["shortfall"] else "") + " |")
    return "\n".join(lines)


def model_table(folders: list[Path]) -> str:
    lines = ["| model | init | recipe | CV | per-fold AUC mean ± SD | frame AUC (95% CI) | patient AUC (95% CI) | "
             "patient accuracy (95% CI) | patients (b/m) | folds with temperature fallback | training time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in folders:
        c = ModelCard.from_json(f / "card.json")
        o = c.overall
        folds = c.evaluation.get("per_fold", [])
        fa = np.array([x["auc"] for x in folds], float)
        init = "scratch" if str(c.init.get("init")) == "scratch" else "ImageNet"
        if c.architecture == "hybrid":
            init = "ImageNet CNN + scratch ViT"
        recipe = c.recipe.get("name", "")
        hp = c.hyperparameters
        if hp.get("colour_augmentation") == "hed":
            recipe += " + HED/HSV colour aug"
        if hp.get("balanced_sampling"):
            recipe += " + balanced sampling"
        fallback = sum(1 for x in folds if "fallback" in str(x.get("temperature_fit", "")))
        lines.append(
            f"| {c.model_id} | {init} | {recipe} | {len(folds)}-fold, 1 split seed | "
            + (f"{np.nanmean(fa):.3f} ± {np.nanstd(fa, ddof=1):.3f}" if len(fa) > 1 else "—")
            + f" | {ci(_d(metric(o)))} | {ci(_d(metric(o, 'patient_auc')))} | {ci(_d(metric(o, 'patient_accuracy')))} | "
            f"{o['n_patients']['benign']}/{o['n_patients']['malignant']} | "
            + (f"{fallback}/{len(folds)}" if any("temperature_fit" in x for x in folds) else "not recorded")
            + f" | {c.training_time_s / 60:.0f} min |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--frozen", type=Path, default=Path("benchmarks/results/frozen_cv.json"))
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--out", type=Path, help="with --compare: write the comparison JSON here")
    a = ap.parse_args()
    if a.compare:
        r = compare(*a.compare)
        if a.out:
            a.out.write_text(json.dumps(r, indent=1) + "\n")
        print(compare_table(r))
        return
    if a.frozen.is_file():
        print("### Frozen-feature recipes, repeated CV\n")
        print(frozen_table(json.loads(a.frozen.read_text())))
        print()
    reps = [json.loads(f.read_text()) for f in sorted(Path("benchmarks/results").glob("repeats_*.json"))]
    if reps:
        print("### Trained recipes, repeated CV (rule 1)\n")
        for r in reps:  # one table per subset of frames (the references are fitted on the same frames)
            print(repeats_table([r]))
            print()
    print("### Every shipped candidate under rule 1\n")
    print(rule1_candidates_table(a.models or list_model_folders(Path("magnif_models"))))
    print()
    print("### Shipped models and candidates, their own CV run\n")
    print(model_table(a.models or list_model_folders(Path("magnif_models"))))


if __name__ == "__main__":
    main()
