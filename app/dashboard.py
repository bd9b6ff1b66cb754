"""What the dashboard pages show, as plain functions (tests call them; pages only render)."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.archs import file_sha256
from models.engine import FramePrediction
from models.card import ALL, MAGNIFICATIONS, TASK_KINDS, CardError, Metric, ModelCard, metric
from models.config import models_root, results_dir
from models.folders import list_model_folders
from models.routing import DefaultsError, read_defaults, resolve
from models.routing.thresholds import few_patients

DISCLAIMER = ("Research aid only, not a diagnosis. Predictions come from models trained on a few dozen "
              "patients; every result must be judged by a qualified pathologist.")


def scan_cards(root: str | Path | None = None, task: str = "malignancy") -> tuple[dict[str, ModelCard], list[str]]:
    """One pass over one task's model folders: every valid card by model id, and one line per refused card."""
    cards, problems = {}, []
    for f in list_model_folders(root, task):
        try:
            c = ModelCard.from_json(f / "card.json")
        except CardError as exc:
            problems.append(str(exc))
            continue
        cards[c.model_id] = c
    return cards, problems


def load_cards(root: str | Path | None = None) -> dict[str, ModelCard]:
    """Every valid card by model id (an invalid one is left out here; `card_problems` says why)."""
    return scan_cards(root)[0]


def card_problems(root: str | Path | None = None) -> list[str]:
    """One line per model folder (of every task) whose card was refused, so the pages can say which models are
    hidden and why."""
    return [p for task in TASK_KINDS for p in scan_cards(root, task)[1]]


def idc_route(root: str | Path | None = None) -> dict | None:
    """The IDC patch model's routing entry, or None (none trained, or the routing file unreadable: Home says so)."""
    return resolve("idc", root=root).entry or None


def subtype_route(root: str | Path | None = None) -> dict | None:
    """The subtype model's routing entry, or None (none trained, or the routing file unreadable)."""
    return resolve("subtype", root=root).entry or None


def subtype_caveat(entry: dict) -> str:
    """What must be read before any subtype: how weak the model is on patients it never saw."""
    lo, hi = entry["balanced_accuracy_ci95"]
    k = max(1, len(entry.get("testable_classes") or []))
    return (f"Subtype model `{entry['model_id']}` ({entry['strategy']}): patient-grouped balanced accuracy "
            f"{entry['balanced_accuracy']:.2f} ({lo:.2f}–{hi:.2f}) over the {k} subtypes with enough patients to "
            f"test, where a guess scores {1 / k:.2f}, on {entry['n_patients']} patients in all. Read the subtype as a "
            "weak hint, never as a diagnosis.")


def subtype_for_frame(slm, p_subtype, p_malignant: float, decision: str):
    """The subtype shown beside a frame's verdict: within the routed model's call (models.subtype), or None when the
    frame was referred or not read (a subtype is never shown without a benign/malignant call)."""
    from models.subtype import call_subtype, subtype_given_binary

    if decision not in ("benign", "malignant") or p_malignant is None or p_subtype is None:
        return None
    return call_subtype(subtype_given_binary(p_subtype, p_malignant), decision == "malignant", slm.card)


def subtype_call_rows(call) -> pd.DataFrame:
    """The top 3 subtypes with their probabilities, for the Diagnose table."""
    from models.subtype import subtype_label

    return pd.DataFrame([{"subtype": subtype_label(s), "probability": p} for s, p in call.top3])


def subtype_recall_line(call) -> str:
    """The called class's patient-grouped CV recall with its CI and patients, or why there is none."""
    from models.subtype import subtype_label

    r = call.cv_recall
    name = subtype_label(call.subtype)
    if not r or r.get("value") is None:
        return f"No cross-validated recall for {name} on the card."
    tail = "" if r.get("testable") else " (too few patients to test: not averaged into the balanced accuracy)"
    return (f"In patient-grouped CV the subtype model recognised {r['value']:.0%} of {name} frames (95% CI "
            f"{r['ci95'][0]:.0%}–{r['ci95'][1]:.0%}; {r['n_patients']} patients){tail}.")


def subtype_confusion(card: ModelCard, result: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(frame counts, row-normalised shares) of a subtype card's out-of-fold confusion matrix; rows = true subtype
    labelled with its patients, columns = called subtype."""
    from models.subtype import subtype_label

    ev = card.evaluation["subtype_cv"]
    res = ev["results"][result or card.evaluation["strategy"]]
    rows = [f"{subtype_label(s)} ({ev['n_patients'][s]} pt)" for s in ev["classes"]]
    counts = pd.DataFrame(res["confusion_counts"], index=rows, columns=[subtype_label(s) for s in ev["classes"]])
    return counts, counts.div(counts.sum(1).replace(0, 1), axis=0)


def subtype_results_table(card: ModelCard) -> pd.DataFrame:
    """Every variant in the card's subtype CV (strategies, the routed parent, the image-wise leakage contrast)."""
    def f(m):
        return "—" if m["value"] is None else f"{m['value']:.2f} ({m['ci95'][0]:.2f}–{m['ci95'][1]:.2f})"

    out = []
    for name, r in card.evaluation["subtype_cv"]["results"].items():
        m = r["metrics"]
        out.append({"variant": name, "split": "image-wise (LEAKAGE)" if r["leakage"] else "patient-grouped",
                    "balanced accuracy": f(m["balanced_accuracy"]), "macro-F1": f(m["macro_f1"]),
                    "8-class accuracy": f(m["accuracy"]), "patient accuracy": f(m["patient_accuracy"])})
    return pd.DataFrame(out)


def evidence_label(auc: Metric | None, n_patients: dict) -> str:
    """What a routed figure is worth, in words that follow its CI: a CI reaching 0.5 is "no better than chance"
    whatever the point estimate; then few patients; else "better than chance"."""
    if auc is None or auc.value != auc.value:
        return "not measured"
    if auc.ci95[0] <= 0.5:
        return "no better than chance (its 95% CI includes 0.5)"
    return "few patients" if few_patients(n_patients) else "better than chance"


def _fmt_ci(m: Metric | None) -> str:
    if m is None or m.value != m.value:
        return "n/a"
    lo, hi = m.ci95
    return f"{m.value:.3f} ({lo:.3f}–{hi:.3f})"


def _fmt_diff(x: dict | None) -> str:
    """A paired AUC difference with its 95% CI, as routing and the repeats write it."""
    return f"{x['difference']:+.3f} ({x['ci95'][0]:+.3f} to {x['ci95'][1]:+.3f})" if x else "—"


def _n(s: dict | None) -> str:
    n = (s or {}).get("n_patients")
    return f"{n['benign']}/{n['malignant']}" if n else ""


def inventory(root: str | Path | None = None) -> pd.DataFrame:
    """One row per magnification: serving model, its AUC (CI) there, patients behind it."""
    cards = load_cards(root)
    try:
        defaults = read_defaults(root)
    except DefaultsError:
        defaults = {}
    rows = []
    for mag in MAGNIFICATIONS:
        r = resolve("malignancy", mag, root)
        if r.model_id is None:
            rows.append({"magnification": mag, "model": "none: " + r.train_command})
            continue
        c = cards.get(r.model_id)
        if c is None:
            rows.append({"magnification": mag, "model": f"{r.model_id}: its card was refused (see the warning above)"})
            continue
        s = c.summaries_at(mag)[0]
        n = s["n_patients"]
        trained = c.data["all"]
        rows.append({
            "magnification": mag, "model": r.model_id, "pooled": c.magnification == ALL,
            "borrowed": c.magnification not in (ALL, mag),
            "AUC (95% CI)": _fmt_ci(metric(s)),
            "patients tested (benign/malignant)": f"{n['benign']}/{n['malignant']}",
            "patients trained on": trained["benign"]["patients"] + trained["malignant"]["patients"],
            "evidence": evidence_label(metric(s), n),
            "serves because": defaults.get(mag, {}).get("reason", ""),
        })
    return pd.DataFrame(rows)


METRIC_NAMES = {
    "auc": "AUC (frames)", "balanced_accuracy": "Balanced accuracy", "sensitivity": "Sensitivity (malignant found)",
    "specificity": "Specificity (benign cleared)", "accuracy": "Accuracy (frames)", "f1": "F1 score",
    "patient_accuracy": "Accuracy (patients)", "patient_score": "Patient score (Spanhol)", "patient_auc": "AUC (patients)",
    "precision": "Precision (PPV)", "ece": "Calibration error (ECE, lower is better)",
    "brier": "Brier score (lower is better)",
}


def metric_name(key: str) -> str:
    """What a clinician reads instead of the metric's key."""
    return METRIC_NAMES.get(key, key.replace("_", " "))


def metrics_table(card: ModelCard, magnification: str | None = None) -> pd.DataFrame:
    """Metric, value, 95% CI for a card (optionally at one magnification of a pooled model)."""
    s = card.summary_at(magnification) if magnification and card.magnification == ALL else card.overall
    ms = {k: metric(s, k) for k in s.get("metrics", {})}
    rows = [{"metric": k, "value": m.value, "ci_low": m.ci95[0], "ci_high": m.ci95[1]} for k, m in ms.items()]
    return pd.DataFrame(rows)


def routing_evidence(magnification: str, root: str | Path | None = None) -> pd.DataFrame:
    """The routing rule's comparisons at one magnification: each challenger's paired AUC advantage over the
    pretrained incumbent with its 95% CI, and whether it displaced the incumbent."""
    try:
        d = read_defaults(root).get(magnification) or {}
    except DefaultsError:
        d = {}
    rows = []
    for r in d.get("comparisons", []):
        diff = r.get("difference")
        rows.append({"challenger": r["challenger"], "vs incumbent": d.get("incumbent"),
                     "AUC advantage (95% CI)": _fmt_diff(r) if diff is not None else r.get("note", "not comparable"),
                     "same folds": r.get("same_folds"), "patients (b/m)": (f"{r['n_patients']['benign']}/"
                                                                          f"{r['n_patients']['malignant']}" if r.get("n_patients") else ""),
                     "displaces": r.get("displaces", False)})
    return pd.DataFrame(rows)


def repeats_rows(magnification: str, root: str | Path | None = None) -> pd.DataFrame:
    """Rule 1 for the trained recipes (`python -m training repeats-cv`, benchmarks/results/repeats_*.json) whose
    frames include this magnification, beside the frozen references on the same folds: how far one run's figure
    moves with the split and training seeds."""
    rows, seen = [], set()
    for f in sorted(Path(root or results_dir()).glob("repeats_*.json")):
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        subset = res.get("magnification", ALL)
        if subset not in (ALL, magnification):
            continue
        frames = "all magnifications" if subset == ALL else f"{subset} only"

        def row(name, v, vs_tiles, runs, fallbacks):
            s = v["summary"]
            n = v["n_patients"]
            at = v.get("per_magnification_auc", {}).get(magnification)
            return {"recipe": name, "frames": frames, "runs": runs,
                    "per-fold AUC mean ± SD (min–max)": f"{v['per_fold_auc_mean']:.3f} ± {v['per_fold_auc_sd']:.3f} "
                                                        f"({v['per_fold_auc_min']:.2f}–{v['per_fold_auc_max']:.2f})",
                    "pooled AUC by split seed": ", ".join(f"{a:.3f}" for a in v["pooled_auc_by_seed"]),
                    "seed-averaged AUC (95% CI)": _fmt_ci(_metric_of(s["auc"])),
                    f"AUC at {magnification}": f"{at:.3f}" if at is not None else "n/a",
                    "patient AUC (95% CI)": _fmt_ci(_metric_of(s["patient_auc"])),
                    "Δ AUC vs frozen mean-tile LR (95% CI)": _fmt_diff(vs_tiles),
                    "Δ AUC vs the routed recipe (95% CI)": _fmt_diff(v.get("vs_incumbent")),
                    "temperature fallbacks": fallbacks, "patients (b/m)": f"{n['benign']}/{n['malignant']}"}
        r = res["recipe"]
        spread = res.get("training_seed_spread", {})
        runs = (f"{len(res['runs'])} runs: split seeds {', '.join(map(str, res['seeds']))}"
                + "".join(f"; training seeds {', '.join(map(str, t['train_seeds']))} on split seed {ss} "
                          f"(pooled AUC SD {t['sd']:.3f})" for ss, t in spread.items()))
        rows.append(row(res["model_id"], r, r.get("vs_tiles_mean_lr"), runs, res["folds_with_temperature_fallback"]))
        for name, v in res.get("references", {}).items():
            if (subset, name) not in seen:
                seen.add((subset, name))
                rows.append(row(f"{name} (frozen Lite2, reference)", v, None,
                                f"split seeds {', '.join(map(str, res['seeds']))}", "—"))
    return pd.DataFrame(rows)


def rule1_summary(model_id: str, root: str | Path | None = None, models: str | Path | None = None) -> dict | None:
    """A shipped model's recipe under rule 1: split-seed-averaged AUC and patient AUC with CIs, per-fold spread,
    pooled AUC per split seed and the source file, from the pointer in its folder's evidence.json
    (models.evidence); None where it was not measured or its evidence cannot be read."""
    from models.evidence import EvidenceError, load_evidence, rule1_figure

    try:
        ptr = load_evidence(Path(models or models_root()) / model_id).rule1
        if ptr is None:
            return None
        v = rule1_figure(ptr, root or results_dir())
    except EvidenceError:
        return None
    return {"source": ptr.file + (f" ({ptr.recipe})" if ptr.recipe else ""), "auc": _metric_of(v.summary["auc"]),
            "patient_auc": _metric_of(v.summary["patient_auc"]), "pooled_auc_by_seed": v.pooled_auc_by_seed,
            "per_fold": f"{v.per_fold_auc_mean:.3f} ± {v.per_fold_auc_sd:.3f}",
            "split_seeds": len(v.pooled_auc_by_seed), "n_patients": v.n_patients, "shortfall": ptr.shortfall}


def _metric_of(d: dict) -> Metric:
    return Metric(d["value"], tuple(d["ci95"]))


def source_and_worst(pred: pd.DataFrame, threshold: float = 0.5, n_worst: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold accuracy/AUC per source repository and magnification, and the frames the model gets most wrong
    (largest |label - p|): where a model wins by recognising a source, or fails on a kind of frame, shows here."""
    from models.metrics import _safe_auc

    pr = pred.dropna(subset=["p_malignant"]).copy()
    pr["repository"] = pr["source"].astype(str).str.split("@").str[0] if "source" in pr else "unknown"
    pr["correct"] = (pr["p_malignant"] >= threshold).astype(int) == pr["label"]
    score = "logit" if "logit" in pr else "p_malignant"
    rows = []
    for (repo, mag), d in pr.groupby(["repository", "magnification"]):
        rows.append({"source repository": repo, "magnification": mag, "frames": len(d),
                     "patients": d["patient"].nunique(), "accuracy": round(float(d["correct"].mean()), 3),
                     "AUC": (f"{a:.3f}" if (a := _safe_auc(d["label"].to_numpy(), d[score].to_numpy())) == a
                             else "n/a (one class)")})
    pr["error"] = (pr["label"] - pr["p_malignant"]).abs()
    worst = pr.sort_values("error", ascending=False).head(n_worst)
    worst = worst.assign(frame=worst["path"].astype(str).map(lambda x: Path(x).name),
                         truth=worst["label"].map({0: "benign", 1: "malignant"}))
    return pd.DataFrame(rows), worst[["frame", "patient", "magnification", "truth", "p_malignant", "repository"]]


def curves(folder: str | Path) -> dict:
    p = Path(folder) / "curves.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def model_folder(model_id: str, root: str | Path | None = None) -> Path:
    return Path(root or models_root()) / model_id


MAX_FILES_PER_UPLOAD = 60  # frames analysed per upload; more are refused with a message (a case is rarely larger)
THUMBNAIL_SIZE = (160, 105)


# What the pages keep of one analysed upload is the engine's typed result (models.engine.FramePrediction) with a
# thumbnail, never the decoded frame, so a cache of many results stays bounded; the frame is decoded again from its
# bytes when a heatmap is asked for.
FrameResult = FramePrediction


def thumbnail_png(img) -> bytes:
    t = img.copy()
    t.thumbnail(THUMBNAIL_SIZE)
    b = io.BytesIO()
    t.save(b, "PNG")
    return b.getvalue()


@dataclass(frozen=True)
class KeptUpload:
    """An uploaded file kept in the session (name and bytes), read like Streamlit's UploadedFile."""

    name: str
    data: bytes

    def getvalue(self) -> bytes:
        return self.data

    @property
    def size(self) -> int:
        return len(self.data)


def readable_png(png: bytes | None) -> bytes | None:
    """The bytes when they are an image PIL can read (a stored thumbnail or heatmap), else None: a damaged record
    shows its caption instead of breaking the page."""
    if not png:
        return None
    try:
        from PIL import Image

        Image.open(io.BytesIO(png)).verify()
        return png
    except Exception:  # noqa: BLE001 - any unreadable bytes
        return None


def png_data_url(png: bytes | None) -> str | None:
    """A PNG as a data: URL, for image columns in tables (None stays None)."""
    import base64

    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def heatmap_png(frame, heatmap, opacity: float, caption: str, width: int = 350) -> bytes:
    """The heatmap over its frame with the colour scale underneath, small, for the case history and its report."""
    from models.gradcam import gradcam_overlay, overlay_with_scale

    ov = gradcam_overlay(frame, heatmap, opacity)
    ov = ov.resize((width, max(1, round(ov.height * width / ov.width))))
    b = io.BytesIO()
    overlay_with_scale(ov, caption).save(b, "PNG")
    return b.getvalue()


def full_resolution_images(frame, heatmap=None, opacity: float = 0.45) -> tuple[bytes, bytes | None]:
    """What History's zoomable viewer shows of a saved frame: the frame as analysed (lossless PNG, so nothing a
    pathologist zooms into is a compression artefact) and, where a heatmap was drawn, its full-size overlay (JPEG,
    quality 90: a derived picture, a fifth of the PNG's size)."""
    from models.gradcam import gradcam_overlay

    b = io.BytesIO()
    frame.convert("RGB").save(b, "PNG", optimize=True)
    if heatmap is None:
        return b.getvalue(), None
    o = io.BytesIO()
    gradcam_overlay(frame, heatmap, opacity).save(o, "JPEG", quality=90)
    return b.getvalue(), o.getvalue()


def decode_frame(data: bytes, name: str):
    """The RGB frame the model analysed (same loader, same reductions and turns), for heatmaps and display."""
    from models.preprocess import load_image

    return load_image(data, name=name).image


def analyse_uploads(predictor, uploads: list[tuple[str, bytes]]) -> list[FramePrediction]:
    """The engine's prediction for each upload (decode, QC, predict, decide; never raises for a bad image), each
    kept with a thumbnail instead of its frame."""
    def keep_thumbnail(result, image) -> None:
        result.thumbnail = thumbnail_png(image)

    return predictor.predict(uploads, each=keep_thumbnail)


def results_frame(results: list[FrameResult], threshold: float, provenance: dict | None = None,
                  verdict=None) -> pd.DataFrame:
    """The downloadable results table (one row per uploaded file, failures included), with its provenance
    (magnification, TTA, time, model id, weights and card sha256) and the case verdict on every row. A referred
    frame has no label (the model declined to call it); a file that could not be analysed says so."""
    prov = provenance or {}
    case = ({"case_verdict": verdict.verdict, "case_reason": verdict.reason} if verdict is not None else {})
    return pd.DataFrame([{**prov, **case,
        "file": r.name, "model_id": r.model_id,
        "p_malignant": None if r.p_malignant is None else round(r.p_malignant, 4),
        "label": "" if r.decision == "refer" else r.label,
        "decision": "not analysed" if r.error else r.decision, "reason": r.reason,
        "threshold": threshold, "error": r.error, "warnings": "; ".join(r.warnings),
    } for r in results])


def export_provenance(lm, magnification: str, tta: bool) -> dict:
    """What a results export must say about how it was made."""
    import datetime as _dt

    return {"analysed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "magnification": magnification, "tta": tta, "model_id": lm.model_id,
            "weights_sha256": lm.card.weights_sha256, "card_sha256": lm.card_sha256}


def performance_line(card: ModelCard, magnification: str) -> str:
    """The model's out-of-fold figures at this magnification, for beside a verdict."""
    s = card.summary_at(magnification)
    m = metric(s)
    if m is None:
        return f"{card.model_id} has no out-of-fold figures at {magnification}."
    n = s["n_patients"]
    pa = metric(s, "patient_accuracy")
    return (f"How good is this model at {magnification}? AUC {_fmt_ci(m)} on frames of {n['benign']} benign / "
            f"{n['malignant']} malignant patients it never saw (cross-validation)"
            + (f"; patient accuracy {_fmt_ci(pa)}" if pa else "") + ".")


def robustness_rows(card, at: str | None = None) -> pd.DataFrame:
    """AUC (CI) as evaluated: plain, with 8-view TTA, and on QC-passing frames only (all out-of-fold)."""
    plain, t = card.summaries_at(at) if at else card.summaries_at(card.magnification)
    qc = card.evaluation.get("qc") or {}
    stain = (card.preprocess.stain or {}).get("method", "none")
    rows = [{"evaluation": f"plain (stain normalisation: {stain})", "AUC (95% CI)": _fmt_ci(metric(plain)),
             "patients (b/m)": _n(plain)}]
    rows.append({"evaluation": "8-view test-time augmentation",
                 "AUC (95% CI)": _fmt_ci(metric(t)) if t else "not measured (train with --tta-eval)",
                 "patients (b/m)": _n(t)})
    q = qc.get("qc_passed_only") if not at else None
    rows.append({"evaluation": f"QC-passing frames only ({qc.get('n_failing', '?')} of {qc.get('n_images', '?')} fail)"
                 if qc else "QC-passing frames only",
                 "AUC (95% CI)": _fmt_ci(metric(q)) if q else ("not measured" if not qc or not at else
                                                                         "see 'all' (QC split is reported overall)"),
                 "patients (b/m)": _n(q)})
    return pd.DataFrame(rows)


def phases_table(card) -> pd.DataFrame:
    """Hybrid phased fine-tuning: each phase's schedule and best validation AUC per fold (what each phase bought)."""
    rows = []
    for k, phases in enumerate(card.recipe.get("phases_per_fold") or []):
        for p in phases:
            rows.append({"fold": k, **{key: p.get(key) for key in ("phase", "max_epochs", "lr", "lr_cnn", "lr_rest",
                                                                 "best_epoch", "best_val_auc")}})
    return pd.DataFrame(rows)


def cross_magnification_rows(card) -> pd.DataFrame:
    """A single-magnification model on held-out patients' frames at the other magnifications."""
    xm = card.evaluation.get("cross_magnification") or {}
    return pd.DataFrame([{"magnification": m, "AUC (95% CI)": _fmt_ci(metric(s)),
                          "AUC with 8-view TTA": _fmt_ci(metric(s["tta"])) if "tta" in s else "not measured",
                          "patients (b/m)": _n(s),
                          "images": s["n_images"]["benign"] + s["n_images"]["malignant"]}
                         for m, s in xm.items() if m != "protocol"])


def compare_agreement(results: list[FrameResult]) -> tuple[str, str]:
    """("success" | "warning", text): agreement across models counts only their calls; any referral or a frame
    that is not H&E-like is said first, so models can never "agree" on a frame that should not be called."""
    refer = [r.model_id for r in results if r.decision == "refer"]
    calls = {r.decision for r in results if r.decision != "refer"}
    notes = []
    if any(r.out_of_distribution for r in results):
        notes.append("quality control: this frame does not look like H&E histology")
    if refer:
        notes.append(f"{len(refer)} of {len(results)} models refer it to the pathologist ({', '.join(refer)})")
    if len(calls) > 1:
        notes.append("the models that call it disagree")
    if notes:
        text = "; ".join(notes) + "."
        return "warning", text[0].upper() + text[1:]
    return "success", f"The models agree: {calls.pop()} (each outside its referral band, quality control passed)."


def decision_rule(lm) -> str:
    """Each model's own decision rule, in one line (Compare states it beside every model's call)."""
    pol = lm.policy
    if pol is None:
        return f"no refer policy: p ≥ {lm.card.threshold:.2f} is called malignant, only quality failures are referred"
    return (f"own refer policy: refer when {pol.band[0]:.2f} ≤ p ≤ {pol.band[1]:.2f} or unlike its training frames; "
            f"else p ≥ {lm.card.threshold:.2f} is malignant")


def case_summary(results: list[FrameResult], magnification: str, threshold: float, policy=None):
    """The case verdict over one upload (models.case, under the model's case policy where it has one), and the
    file-name / picker disagreements to warn about."""
    from models.case import CaseFrame, case_verdict, magnification_from_name

    notes, frames = [], []
    for r in results:
        named = magnification_from_name(r.name)
        if named and named != magnification:
            notes.append(f"{r.name}: the file name says {named} but {magnification} was chosen; it was analysed by the "
                         f"{magnification} model")
        frames.append(CaseFrame(r.name, magnification, r.model_id, r.p_malignant, r.decision if not r.error else "refer",
                                r.reason or r.error, kind=r.decision_kind if not r.error else "unreadable",
                                content_sha256=getattr(r, "pixel_sha256", "")))
    return case_verdict(frames, threshold, policy=policy), notes


def _pct_ci(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.0%} ({lo:.0%}–{hi:.0%})"


def case_evidence_rows(policy) -> pd.DataFrame:
    """Case-level risk-coverage beside the frame-level one, from the policy's nested validation (held-out patients
    only): share called, accuracy among called, with patient-bootstrap CIs and patient counts."""
    nested = ((policy.case_policy if policy is not None else None) or {}).get("nested") or {}
    rows = []
    labels = {"6": "case of 6 frames", "all": "case of all a patient's frames at one magnification",
              "frames": "single frame (frame-level band)"}
    for key, label in labels.items():
        blk = nested.get("by_size", {}).get(key)
        if not blk:
            continue
        for rule, name in (("case_policy", "case policy (band frames count)"),
                           ("old_rule", "before: band frames dropped, CI rule")) if key != "frames" else \
                (("frames", "frame band"),):
            v = blk if key == "frames" else blk.get(rule)
            if not v:
                continue
            n = v["n_patients"]
            rows.append({"unit": label, "rule": name, "called (95% CI)": _pct_ci(v["coverage"]),
                         "accuracy when called (95% CI)": _pct_ci(v["accuracy"]),
                         "patients (b/m)": f"{n['benign']}/{n['malignant']}", "cases": v["n_cases"]})
    return pd.DataFrame(rows)


def routed_policies(root: str | Path | None = None) -> dict:
    """The refer policy (with its case policy) of each routed malignancy model, by model id; a model without a
    readable policy maps to None (its verdicts say so)."""
    from models.refer import ReferPolicy

    out = {}
    for m in MAGNIFICATIONS:
        mid = resolve("malignancy", m, root).model_id
        if mid and mid not in out:
            try:
                out[mid] = ReferPolicy.load(Path(root or models_root()) / mid)
            except (OSError, ValueError, KeyError, TypeError):
                out[mid] = None
    return out


def case_evidence_line(policy) -> str:
    """One sentence: how often the case policy answers, and how often it is right, on held-out patients."""
    cp = (policy.case_policy if policy is not None else None) or {}
    blk = (cp.get("nested") or {}).get("by_size", {}).get("6", {}).get("case_policy")
    if not blk:
        return "No case policy fitted for this model: cases are judged by the older CI rule."
    n = blk["n_patients"]
    return (f"Case policy validated on held-out patients ({n['benign']} benign / {n['malignant']} malignant): cases of "
            f"6 frames are called {_pct_ci(blk['coverage'])} of the time, and are right {_pct_ci(blk['accuracy'])} of "
            "the times they are called; the rest are referred.")


def uncertainty_evidence_line(model_id: str, result: str | Path | None = None, root: str | Path | None = None) -> str:
    """What the held-out check (scripts/frame_uncertainty_check.py) says about per-frame uncertainty for this model,
    in one sentence; empty when it was not run for this very card (same sha256). A signal is called validated only
    when its CI is above 0.5."""
    path = Path(result) if result else results_dir() / "frame_uncertainty.json"
    try:
        res = json.loads(path.read_text())
        card = model_folder(model_id, root) / "card.json"
        if res.get("card_sha256") != file_sha256(card):
            return ""  # measured for another model, or for an earlier version of this one
    except (OSError, ValueError):
        return ""
    ed = res.get("error_detection", {})
    names = {"closeness_to_threshold": "closeness to the threshold",
             "ensemble_member_spread": "the ensemble members' disagreement"}
    parts = [f"{names.get(k, k)} (AUROC {v['auroc_for_errors']:.2f}, 95% CI {v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})"
             for k, v in ed.items() if isinstance(v, dict)]
    if not parts:
        return ""
    ok = [k for k, v in ed.items() if isinstance(v, dict) and v.get("validated")]
    head = ("On out-of-fold frames, " + " and ".join(parts) + (
        " told wrong calls from right ones better than chance only for " + ", ".join(names.get(k, k) for k in ok)
        if ok else " did not tell wrong calls from right ones better than chance: one frame's p is weak evidence; "
                   "the case verdict over several frames is what was validated"))
    return head + f" ({res['patients']} patients; `{res.get('command', 'scripts/frame_uncertainty_check.py')}`)."


def baseline_sentence(folder: str | Path, magnification: str | None = None, n_boot: int = 1000) -> str:
    """Whether a model beats its frozen-feature baseline, in words, from a paired patient bootstrap on the same
    out-of-fold frames (predictions.csv's p_baseline column); empty when the folder has no baseline scores."""
    from models.metrics import paired_auc_difference

    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        return ""
    p = pd.read_csv(path, dtype={"patient": str})
    if "p_baseline" not in p:
        return ""
    if magnification:
        p = p[p["magnification"] == magnification]
    p = p.dropna(subset=["p_malignant", "p_baseline"])
    if p.empty or p["label"].nunique() < 2:
        return ""
    score = "logit" if "logit" in p and p["logit"].notna().all() else "p_malignant"
    d = paired_auc_difference(p["label"], p[score], p["p_baseline"], p["patient"], n_boot=n_boot)
    diff, (lo, hi) = d["difference"], d["ci95"]
    n = d["n_patients"]
    tail = (f"(AUC {diff:+.3f}; paired patient-bootstrap 95% CI {lo:+.3f} to {hi:+.3f}; {n['benign']} benign / "
            f"{n['malignant']} malignant patients, same out-of-fold frames)")
    if lo > 0:
        return f"This model beats the frozen-feature baseline {tail}."
    if diff <= 0:
        return f"This model does not beat the frozen-feature baseline: its AUC is lower {tail}."
    return (f"This model does not beat the frozen-feature baseline by a margin these patients can show: its AUC is "
            f"higher, but the CI includes no difference {tail}.")
