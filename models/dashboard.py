"""What the dashboard pages show, as plain functions (tests call them; pages only render)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from models.card import ModelCard
from models.inference import MAGNIFICATIONS, list_model_folders, models_root, read_defaults

FEW_PATIENTS = 20  # fewer patients than this behind a number: labelled "few patients"
DISCLAIMER = ("Research aid only, not a diagnosis. Predictions come from models trained on a few dozen "
              "patients; every result must be judged by a qualified pathologist.")


@dataclass
class Route:
    magnification: str
    model_id: str | None
    notes: list[str]
    train_command: str = ""


def train_command(magnification: str) -> str:
    return (f"python -m training train --data PATH/TO/BreaKHis_v1.tar.gz --magnification {magnification} "
            f"--arch efficientnet_lite2 --init ../shared/weights/efficientnet_lite2_in1k.safetensors "
            f"--out magnif_models/{magnification}/efficientnet_lite2 && python -m training select-defaults")


def load_cards(root: str | Path | None = None) -> dict[str, ModelCard]:
    """Every shipped card by model id."""
    return {c.model_id: c for c in (ModelCard.from_json(f / "card.json") for f in list_model_folders(root))}


def route(magnification: str, root: str | Path | None = None) -> Route:
    """Which model serves a magnification, and what the user must be told about it."""
    d = read_defaults(root).get(magnification)
    if not d:
        return Route(magnification, None, [f"No model is trained for {magnification}."], train_command(magnification))
    notes = []
    if d.get("pooled"):
        notes.append(f"{magnification} is served by a pooled model trained on all magnifications "
                     f"({d['model_id']}), because it validated best here or no {magnification}-only model exists.")
    n = d["n_patients"]
    if d.get("few_patients") or n["benign"] + n["malignant"] < FEW_PATIENTS:
        notes.append(f"Its {magnification} figures rest on few patients ({n['benign']} benign, {n['malignant']} "
                     "malignant): treat them as weak evidence.")
    if d["auc"] < 0.75:
        notes.append(f"Validated AUC at {magnification} is only {d['auc']:.2f}: a weak model.")
    return Route(magnification, d["model_id"], notes)


def _fmt_ci(m: dict) -> str:
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v:.3f} ({lo:.3f}–{hi:.3f})" if v == v else "n/a"


def inventory(root: str | Path | None = None) -> pd.DataFrame:
    """One row per magnification: serving model, its AUC (CI) there, patients behind it."""
    cards = load_cards(root)
    rows = []
    for mag in MAGNIFICATIONS:
        r = route(mag, root)
        if r.model_id is None:
            rows.append({"magnification": mag, "model": "none: " + r.train_command})
            continue
        c = cards[r.model_id]
        s = c.per_magnification.get(mag) if c.magnification == "all" else c.evaluation["overall"]
        n = s["n_patients"]
        trained = c.data["all"]
        rows.append({
            "magnification": mag, "model": r.model_id, "pooled": c.magnification == "all",
            "AUC (95% CI)": _fmt_ci(s["metrics"]["auc"]),
            "patients tested (benign/malignant)": f"{n['benign']}/{n['malignant']}",
            "patients trained on": trained["benign"]["patients"] + trained["malignant"]["patients"],
            "evidence": "few patients" if n["benign"] + n["malignant"] < FEW_PATIENTS else "moderate",
        })
    return pd.DataFrame(rows)


def metrics_table(card: ModelCard, magnification: str | None = None) -> pd.DataFrame:
    """Metric, value, 95% CI for a card (optionally at one magnification of a pooled model)."""
    s = card.per_magnification[magnification] if magnification and card.magnification == "all" else card.evaluation["overall"]
    rows = [{"metric": k, "value": v["value"], "ci_low": v["ci95"][0], "ci_high": v["ci95"][1]} for k, v in s["metrics"].items()]
    return pd.DataFrame(rows)


def curves(folder: str | Path) -> dict:
    p = Path(folder) / "curves.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def model_folder(model_id: str, root: str | Path | None = None) -> Path:
    return Path(root or models_root()) / model_id


@dataclass
class FrameResult:
    name: str
    model_id: str
    p_malignant: float | None = None
    label: str = ""
    error: str = ""
    warnings: tuple[str, ...] = ()
    out_of_distribution: bool = False
    image: object = None  # PIL RGB image when readable


def analyse_upload(lm, name: str, data: bytes, magnification: str, tta: bool = False) -> FrameResult:
    """Decode, check quality and predict one uploaded file; never raises for a bad image."""
    from models.preprocess import ImageError, load_image
    from models.quality import check_quality

    try:
        li = load_image(data, name=name)
    except ImageError as exc:
        return FrameResult(name, lm.model_id, error=str(exc))
    q = check_quality(li.image, magnification)
    notes: list[str] = []
    p = float(lm.predict_images([li.image], tta=tta, notes=[notes])[0])
    return FrameResult(name, lm.model_id, p, lm.label_for(p), "", tuple(li.warnings + q.warnings + notes),
                       q.out_of_distribution, li.image)


def results_frame(results: list[FrameResult], threshold: float) -> pd.DataFrame:
    """The downloadable results table (one row per uploaded file, failures included)."""
    return pd.DataFrame([{
        "file": r.name, "model_id": r.model_id,
        "p_malignant": None if r.p_malignant is None else round(r.p_malignant, 4),
        "label": r.label if not r.out_of_distribution else f"{r.label} (unreliable: not H&E-like)",
        "threshold": threshold, "error": r.error, "warnings": "; ".join(r.warnings),
    } for r in results])
