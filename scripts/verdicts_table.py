"""The README's issue-25 tables, printed from the files the scripts wrote (nothing typed by hand):
the seed ensemble against its single run, per-magnification temperatures, case- and frame-level risk-coverage from the
nested validation, the QC refusal table and the training-speed benchmark.

    python scripts/verdicts_table.py [--model magnif_models/all/efficientnet_lite2_ensemble]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ci(m: dict, pct: bool = False) -> str:
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.0%} ({lo:.0%}–{hi:.0%})" if pct else f"{v:.3f} ({lo:.3f}–{hi:.3f})"


def ensemble_section(folder: Path) -> None:
    card = json.loads((folder / "card.json").read_text())
    ev = card["evaluation"]
    auc = ev["overall"]["metrics"]["auc"]
    n = ev["overall"]["n_patients"]
    print(f"**{card['model_id']}**: {len(card['arch_config']['members'])} members, frame AUC {_ci(auc)} over "
          f"{n['benign']} benign / {n['malignant']} malignant patients (out-of-fold, split seed "
          f"{card['hyperparameters'].get('seed')}).\n")
    print("| member | training seed | out-of-fold frame AUC | ensemble minus it (paired 95% CI) |")
    print("|---|---|---|---|")
    for m, d in zip(card["arch_config"]["members"], ev["vs_each_member"]):
        print(f"| {m['weights_file']} | {m['train_seed']} | {m['oof_auc']:.3f} | {d['difference']:+.3f} "
              f"({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}) |")
    s = ev["vs_single_run"]
    print(f"\nEnsemble vs the single run it replaces ({s['single_run_model_id']}): {s['difference']:+.3f} "
          f"(paired patient-bootstrap 95% CI {s['ci95'][0]:+.3f} to {s['ci95'][1]:+.3f}).\n")
    pm = ev.get("overall") and card.get("per_magnification") or {}
    print("| magnification | ensemble AUC (95% CI) | patients (b/m) | temperature |")
    print("|---|---|---|---|")
    for g, sm in sorted(pm.items(), key=lambda kv: ("40X", "100X", "200X", "400X").index(kv[0])):
        t = card["temperature_by_magnification"].get(g)
        print(f"| {g} | {_ci(sm['metrics']['auc'])} | {sm['n_patients']['benign']}/{sm['n_patients']['malignant']} | "
              + (f"{t['temperature']:.2f} (own)" if t else f"{card['temperature']:.2f} (pooled: < 5 patients per class)")
              + " |")


def latency_section(path: Path) -> None:
    r = json.loads(path.read_text())
    p, g = r["predict_path_s"], r["gradcam_s"]
    print(f"Predict path per frame (decode, QC, {r['members']} forwards with the OOD embedding, calibration, decision; "
          f"{r['frames']} native PNG frames, {r['threads']} threads): single {p['single'] * 1000:.0f} ms, ensemble "
          f"{p['ensemble'] * 1000:.0f} ms, **ratio {r['ratio']['predict_path']:.2f}**; Grad-CAM (every member's map, "
          f"averaged by pytorch-grad-cam): {g['single']:.2f} s vs {g['ensemble']:.2f} s, ratio {r['ratio']['gradcam']:.2f}. "
          "Fast enough for the Diagnose page, so no student was distilled.")


def pipeline_section(folder: Path) -> None:
    """The new training pipeline's run against the old pipeline's run of the same recipe on the same folds (the
    ensemble's first two members: the shipped run, and training seed 10 trained after the speed changes)."""
    import numpy as np
    import pandas as pd

    from models.metrics import paired_auc_difference

    card = json.loads((folder / "card.json").read_text())
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str})
    m = card["arch_config"]["members"]
    d = paired_auc_difference(pred["label"].to_numpy(int), pred["logit_member1"].to_numpy(float),
                              pred["logit_member0"].to_numpy(float), pred["patient"].to_numpy(), n_boot=2000, seed=0)
    print(f"New pipeline ({m[1]['weights_file']}, training seed {m[1]['train_seed']}, "
          f"{m[1]['training_time_s'] / 60:.1f} min) minus old pipeline ({m[0]['weights_file']}, training seed "
          f"{m[0]['train_seed']}, {m[0]['training_time_s'] / 60:.1f} min), same folds: AUC {d['auc_challenger']:.3f} vs "
          f"{d['auc_incumbent']:.3f}, difference {d['difference']:+.3f} (paired 95% CI {d['ci95'][0]:+.3f} to "
          f"{d['ci95'][1]:+.3f}); the two runs also differ in training seed, so this bounds seed and pipeline together.")


def idc_section(path: Path) -> None:
    r = json.loads(path.read_text())
    d = r["fine_tuned_minus_frozen"]
    print(f"{r['n_patches']} patches, {r['n_patients']} patients. {r['protocol']}.\n")
    print("| IDC recipe | patch AUC (95% CI) | balanced accuracy (95% CI) |")
    print("|---|---|---|")
    for k, name in (("fine_tuned", "Lite2 fine-tuned end to end (HED + HSV augmentation)"),
                    ("frozen", "Lite2 frozen + logistic regression")):
        print(f"| {name} | {_ci(r[k]['auc'])} | {_ci(r[k]['balanced_accuracy'])} |")
    print(f"\nFine-tuned minus frozen: {d['difference']:+.3f} (paired patient-bootstrap 95% CI {d['ci95'][0]:+.3f} to "
          f"{d['ci95'][1]:+.3f}): {'routes (CI above zero)' if r['routes'] else 'does not route (the CI includes zero or lies below it)'}; "
          f"{r['minutes']:.0f} min ({r['compute']}).")
    d224 = r.get("fine_tuned_minus_frozen_224")
    if d224:
        print(f"\nAgainst the frozen recipe at the shipped frozen model's 224x224 input, same folds: {d224['difference']:+.3f} "
              f"(paired 95% CI {d224['ci95'][0]:+.3f} to {d224['ci95'][1]:+.3f}; frozen AUC {d224['auc_incumbent']:.3f}).")
    if r.get("shipped"):
        print(f"Shipped as `{r['shipped']}` and routed for IDC by the paired rule (models.routing.rule.task_entry). Its "
              "AUC above is the figure it was chosen on (one comparison of two recipes fixed in advance, so the "
              "selection optimism is small, but it is not an independent estimate: no held-out IDC patients remain).")


def _by_magnification(d: dict) -> list:
    """A per-magnification dict's items in the microscope's order (40X, 100X, 200X, 400X)."""
    from models.card import MAGNIFICATIONS

    return sorted(d.items(), key=lambda kv: MAGNIFICATIONS.index(kv[0]) if kv[0] in MAGNIFICATIONS else 9)


def idc_init_section(path: Path) -> None:
    r = json.loads(path.read_text())
    d = r["pooled"]
    print(f"The routed recipe (pooled Lite2, full fine-tune, HED/HSV augmentation, balanced sampling, 6 epochs) started "
          f"from the IDC fine-tuned backbone instead of ImageNet, split seed 0 and training seed 0 as the shipped single "
          f"run, same {r['n_frames']} out-of-fold frames ({d['n_patients']['benign']} benign / "
          f"{d['n_patients']['malignant']} malignant patients; same folds: {r['same_folds']}).\n")
    print("| initialisation | AUC, out-of-fold frames | difference vs ImageNet (paired 95% CI) |")
    print("|---|---|---|")
    print(f"| ImageNet (shipped single run) | {d['auc_incumbent']:.3f} | — |")
    print(f"| IDC fine-tuned (in-domain tissue first) | {d['auc_challenger']:.3f} | {d['difference']:+.3f} "
          f"({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}) |")
    for mag, m in _by_magnification(r["per_magnification"]):
        print(f"| &nbsp;&nbsp;at {mag} ({m['n_patients']['benign']}/{m['n_patients']['malignant']} patients) | "
              f"{m['auc_challenger']:.3f} vs {m['auc_incumbent']:.3f} | {m['difference']:+.3f} "
              f"({m['ci95'][0]:+.3f} to {m['ci95'][1]:+.3f}) |")
    print(f"\n{'Adopted' if r['adopted'] else 'Not adopted'} by the paired rule ({r['rule']}); the routed recipe "
          f"{'now starts from the IDC backbone' if r['adopted'] else 'keeps its ImageNet initialisation'}. One training "
          "seed per arm: the difference bounds the initialisation and run-to-run noise together.")


def threshold_section(path: Path) -> None:
    r = json.loads(path.read_text())
    n = r["n_patients"]
    print(f"{r['protocol']} ({n['benign']} benign / {n['malignant']} malignant patients).\n")
    print("| magnification | balanced accuracy, threshold 0.5 | per-magnification threshold |")
    print("|---|---|---|")
    for g, m in _by_magnification(r["per_magnification"]):
        print(f"| {g} ({m['n_patients']['benign']}/{m['n_patients']['malignant']} patients) | {m['single']:.3f} | "
              f"{m['per_magnification']:.3f} |")
    print(f"| all | {r['balanced_accuracy_single_threshold']:.3f} | {r['balanced_accuracy_per_magnification']:.3f} |")
    th = {g: sorted({f['thresholds'][g] for f in r['folds'] if g in f['thresholds']}) for g in r["per_magnification"]}
    print(f"\nGain {r['difference']:+.3f} (paired patient-bootstrap 95% CI {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}): "
          f"{'adopted' if r['adopted'] else 'not adopted; the card keeps one threshold (0.5) for every magnification'}. "
          "Thresholds the inner folds chose: " + "; ".join(f"{g} {', '.join(f'{t:.2f}' for t in v) or 'none (too few patients)'}"
                                                        for g, v in th.items()) + ".")


def case_section(folder: Path) -> None:
    pol = json.loads((folder / "refer.json").read_text())
    cp = pol.get("case_policy")
    if not cp:
        print("(no case policy fitted)")
        return
    print(f"Shipped case policy: call when |mean p − {cp['threshold']}| × min(frames, {cp['frame_cap']})^"
          f"{cp['exponent']} ≥ {cp['min_margin']:.3f} ({cp['note']}). Frame band: {pol['band'][0]:.2f}–"
          f"{pol['band'][1]:.2f}.\n")
    nested = cp["nested"]
    print("| unit | rule | called (95% CI) | accuracy when called (95% CI) | patients (b/m) | cases |")
    print("|---|---|---|---|---|---|")
    for key, label in (("6", "case of 6 frames"), ("all", "all of a patient's frames at one magnification")):
        for rule, name in (("case_policy", "case policy: band frames count"),
                           ("old_rule", "before: band frames dropped, CI rule")):
            v = nested["by_size"][key][rule]
            print(f"| {label} | {name} | {_ci(v['coverage'], True)} | {_ci(v['accuracy'], True)} | "
                  f"{v['n_patients']['benign']}/{v['n_patients']['malignant']} | {v['n_cases']} |")
    v = nested["by_size"]["frames"]
    print(f"| single frame | frame band | {_ci(v['coverage'], True)} | {_ci(v['accuracy'], True)} | "
          f"{v['n_patients']['benign']}/{v['n_patients']['malignant']} | {v['n_cases']} |")
    print("\nShare of cases called by case size (held-out patients): " + ", ".join(
        f"{k}: {v['coverage']:.0%}" + (f" ({v['accuracy']:.0%} right)" if v["accuracy"] is not None else "")
        for k, v in nested["coverage_by_case_size"].items()) + f". Outer-fold margins: {nested['outer_margins']}.")


def served_gap_section(path: Path) -> None:
    r = json.loads(path.read_text())
    print("The policy is fitted on fold models' out-of-fold logits but applied to a model trained on every patient. "
          "Measured with the recipe cheap enough to nest (frozen Lite2 + logistic regression, `python -m training "
          "served-policy-gap`): in each outer fold the policy is fitted on the inner folds' out-of-fold logits, then "
          "applied to the outer patients' logits of (a) a model refitted on all outer-training patients, as served, "
          "and (b) an inner-fold-sized model, like those it was fitted on.\n")
    print("| applied to | case of | called (95% CI) | accuracy when called (95% CI) | patients (b/m) |")
    print("|---|---|---|---|---|")
    for name, label in (("fold_model", "fold-sized model (as fitted)"), ("served_model", "all-patient model (as served)")):
        for size in ("6", "all"):
            v = r[name][size]
            print(f"| {label} | {'6 frames' if size == '6' else 'all frames'} | {_ci(v['coverage'], True)} | "
                  f"{_ci(v['accuracy'], True)} | {v['n_patients']['benign']}/{v['n_patients']['malignant']} |")
    sc = r["logit_scale"]
    mean = lambda k: sum(x[k] for x in sc) / len(sc)  # noqa: E731
    print(f"\nLogit spread (SD) on held-out patients: all-patient model {mean('sd_served_on_outer'):.2f}, fold-sized "
          f"model {mean('sd_fold_models_on_outer'):.2f}; inner out-of-fold logits the policy was fitted on "
          f"{mean('sd_inner_oof'):.2f}.")


def qc_section(path: Path) -> None:
    r = json.loads(path.read_text())
    thr = {**r["thresholds"], "not_histology": "texture / smoothness / H&E", "any": "any"}
    print(f"| check | threshold | frames refused (of {r['n_frames']}) | 40X | 100X | 200X | 400X | worst patient | "
          "patients losing > 1/3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, v in r["refusals"].items():
        pm, w = v["per_magnification"], v["worst_patient"]
        print(f"| {k} | {thr.get(k)} | {v['frames']} ({v['share']:.1%}) | "
              + " | ".join(f"{pm.get(g, {}).get('frames', 0)}/{pm.get(g, {}).get('of', 0)}" for g in ("40X", "100X", "200X", "400X"))
              + f" | {w['frames']}/{w['of']} | {v['patients_losing_over_a_third']} |")
    lopo = r["leave_one_patient_out"]
    print("\nLeave-one-patient-out (threshold from the other patients): " + ", ".join(
        f"{k} {v['frames_refused']} of {r['n_frames']}" for k, v in lopo.items()) + ". Refused: generated "
          + ", ".join(f"{k} {v:.0%}" for k, v in r["corpus"]["generated"].items())
          + f" ({r['corpus']['n_generated']} images); IDC patches as uploaded {r['corpus']['idc_as_uploaded']['refused']:.0%}"
          f" and enlarged to a frame {r['corpus']['idc_blown_up_to_a_frame']['refused']:.0%} "
          f"({r['corpus']['idc_blown_up_to_a_frame']['n']}).")


def speed_section(path: Path) -> None:
    r = json.loads(path.read_text())
    s = r["seconds"]
    old_step = f"{s['train_step_old']:.2f} s → " if "train_step_old" in s else ""
    print(f"Compute: {r['compute']}. Per optimiser step {old_step}{s['train_step']:.2f} s (fp32 {s['train_step_fp32']:.2f} s); "
          f"evaluation per frame {s['eval_frame_fp32_old'] * 1000:.0f} ms (fp32) → {s['eval_frame_fp32_channels_last'] * 1000:.0f} ms "
          f"(fp32, channels_last), early-stopping pass {s['validation_frame_new'] * 1000:.0f} ms; decoding "
          f"{s['decode_old']:.1f} s → {s['decode_cache_hit']:.1f} s.\n")
    print("| recipe | old (min) | new (min) | old/new | fp32-only old | fp32-only new | fp32 old/new |")
    print("|---|---|---|---|---|---|---|")
    for p in r["projection"]:
        print(f"| {'with' if p['tta_eval'] else 'without'} --tta-eval | {p['old_minutes']:.1f} | {p['new_minutes']:.1f} | "
              f"{p['ratio_old_over_new']:.2f} | {p['fp32_only_old_minutes']:.1f} | {p['fp32_only_new_minutes']:.1f} | "
              f"{p['fp32_only_ratio']:.2f} |")
    if "measured_run" in r:
        m = r["measured_run"]
        print(f"\nMeasured: `{m['run']}` took {m['minutes']:.1f} min end to end ({m['compute']}; TTA eval {m['tta_eval']}).")
    if "paired_auc" in r:
        d = r["paired_auc"]
        print(f"\nSame command and seeds (split seed 0, training seed 0), new pipeline minus old (`{d['old_run']}`, "
              f"{d['old_minutes']:.0f} min, {d['old_compute']}): out-of-fold AUC {d['auc_challenger']:.3f} vs "
              f"{d['auc_incumbent']:.3f}, difference {d['difference']:+.3f} (paired patient-bootstrap 95% CI "
              f"{d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}; {d['n_images']} frames, {d['n_patients']['benign']} benign / "
              f"{d['n_patients']['malignant']} malignant patients).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="magnif_models/all/efficientnet_lite2_ensemble")
    a = ap.parse_args()
    folder = ROOT / a.model
    for title, fn, arg in (("Seed ensemble", ensemble_section, folder),
                           ("Ensemble latency", latency_section, ROOT / "benchmarks/results/ensemble_latency.json"),
                           ("Training pipeline: new vs old on the same folds", pipeline_section, folder),
                           ("Cases and frames", case_section, folder),
                           ("Fold models vs the served model", served_gap_section,
                            ROOT / "benchmarks/results/served_policy_gap.json"),
                           ("IDC: fine-tuned vs frozen", idc_section, ROOT / "benchmarks/results/idc_finetune.json"),
                           ("Per-magnification threshold", threshold_section,
                            ROOT / "benchmarks/results/threshold_cv.json"),
                           ("IDC fine-tuning as the BreakHis initialisation", idc_init_section,
                            ROOT / "benchmarks/results/idc_init_breakhis.json"),
                           ("Quality control", qc_section, ROOT / "benchmarks/results/qc_refusals.json"),
                           ("Training speed", speed_section, ROOT / "benchmarks/results/train_speed.json")):
        print(f"\n##### {title}\n")
        try:
            fn(arg)
        except FileNotFoundError as exc:
            print(f"(not measured yet: {exc.filename} is missing)")


if __name__ == "__main__":
    main()
