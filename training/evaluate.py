"""`evaluate` on held-out patients, the leakage demonstration, and validation-driven default selection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.inference import load_model_folder
from models.card import ALL, ModelCard, metric
from models.metrics import curve_points, summarize
from training.data import index_source


def evaluate_model(model_dir: str | Path, data: str | Path, magnification: str | None = None,
                   n_boot: int = 1000, cache_dir: Path | None = None, tta: bool = False) -> tuple[dict, pd.DataFrame]:
    """Metrics on patients the model never fitted on (its split's test part, or patients absent from it)."""
    lm = load_model_folder(model_dir)
    mag = magnification or lm.card.magnification
    df = index_source(data, cache_dir).frame
    if mag != ALL:
        df = df[df["magnification"] == mag]
    split = pd.read_csv(Path(model_dir) / lm.card.split_file, dtype={"patient": str})
    fitted = set(split.loc[split["part"].isin(["train", "val"]), "patient"])
    held = df[~df["patient"].astype(str).isin(fitted)].reset_index(drop=True)
    if held.empty:
        raise ValueError(
            f"{model_dir}: every patient in {data} at {mag} was used to fit this model; there is nothing held out. "
            "Its card reports cross-validated out-of-fold metrics instead.")
    from models.engine import MalignancyPredictor

    # the engine's predictor, as the CLI and the pages use it; the held-out frames keep the card's pooled temperature
    # (magnification=None) so the figure is comparable with the card's cross-validated one
    predictor = MalignancyPredictor(lm, magnification=None, tta=tta)
    probs, rows, qc = [], [], []
    for path in held["path"]:
        r = predictor.predict_one(str(path))
        if r.ok:
            probs.append(float(r.probability))
            qc.append(r.decision_kind != "qc")
        else:
            probs.append(np.nan)
            qc.append(False)
            rows.append((path, r.error))
    held["p_malignant"] = probs
    held["qc_pass"] = qc
    ok = held["p_malignant"].notna().to_numpy()
    y = (held["label"] == "malignant").astype(int).to_numpy()
    res = summarize(y[ok], held["p_malignant"].to_numpy()[ok], held["patient"].to_numpy()[ok],
                    threshold=lm.card.threshold, n_boot=n_boot)
    res.update(model_id=lm.model_id, magnification=mag, curves=curve_points(y[ok], held["p_malignant"].to_numpy()[ok]),
               skipped=[{"path": p, "reason": r} for p, r in rows], temperature=lm.card.temperature, tta=tta)
    okq = ok & held["qc_pass"].to_numpy(bool)
    res["qc"] = {"n_failing": int((ok & ~okq).sum()),
                 "qc_passed_only": summarize(y[okq], held["p_malignant"].to_numpy()[okq], held["patient"].to_numpy()[okq],
                                             threshold=lm.card.threshold, n_boot=n_boot) if okq.any() else None}
    return res, held


def leakage_demo(data: str, magnification: str, k: int = 5, seed: int = 0, cache_dir: Path | None = None) -> dict:
    """Same recipe (frozen Lite2 features + logistic regression) on image-wise vs patient-wise folds."""
    from sklearn.model_selection import StratifiedKFold
    from models.archs import ARCHITECTURES, build_model
    from models.card import PreprocessConfig
    from models.metrics import image_metrics
    from training.data import default_cache_dir
    from training.engine import cache_images, cached_features, sample_weights
    from training.splits import grouped_kfold
    from training.train import BASELINE_WEIGHTS, baseline_probs, select_rows

    cache_dir = Path(cache_dir or default_cache_dir())
    df = select_rows(index_source(data, cache_dir), magnification)
    spec = ARCHITECTURES["efficientnet_lite2"]
    cfg = PreprocessConfig(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    images, keep, _ = cache_images(df, cfg)
    df = df.iloc[keep].reset_index(drop=True)
    model, rec = build_model("efficientnet_lite2", str(BASELINE_WEIGHTS))
    feats = cached_features(model, images, cfg, cache_dir)
    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)
    out = {}
    folds = {"image_wise_random": np.zeros(len(df), int), "patient_grouped": grouped_kfold(df, k, seed).to_numpy()}
    for i, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(feats, y)):
        folds["image_wise_random"][te] = i
    for name, f in folds.items():
        p = np.zeros(len(df))
        for j in np.unique(f):
            te, tr = np.flatnonzero(f == j), np.flatnonzero(f != j)
            p[te] = baseline_probs(feats, y, w, tr, te)
        out[name] = {"auc": image_metrics(y, p)["auc"], "accuracy": image_metrics(y, p)["accuracy"],
                     "folds": int(len(np.unique(f)))}
    out["auc_inflation"] = out["image_wise_random"]["auc"] - out["patient_grouped"]["auc"]
    out["note"] = ("LEAKAGE DEMONSTRATION, not a model result: an image-wise split puts frames of the same patient "
                   "in train and test, and the AUC it reports is inflated by recognising patients.")
    out.update(magnification=magnification, n_images=int(len(df)), n_patients=int(df["patient"].nunique()),
               command=f"python -m training leakage-demo --data {data} --magnification {magnification}")
    return out


def pick_better(candidates: list[str | Path], out: str | Path) -> dict:
    """Ship the candidate (same data, same outer folds) with the higher cross-validated AUC; record why."""
    import datetime as _dt
    import shutil

    cards = [(Path(c), ModelCard.from_json(Path(c) / "card.json")) for c in candidates]
    folds = {json.dumps([f["test_patients"] for f in c.evaluation.get("per_fold", [])]) for _, c in cards}
    if len(folds) != 1:
        raise ValueError("candidates were not cross-validated on the same outer folds; they cannot be compared")
    rows = [{"candidate": str(p), "recipe": c.recipe.get("name"), "stain": (c.preprocess.stain or {}).get("method", "none"),
             "auc": metric(c.overall).value, "auc_ci95": list(metric(c.overall).ci95),
             "patient_auc": metric(c.overall, "patient_auc").value} for p, c in cards]
    best_i = max(range(len(rows)), key=lambda i: rows[i]["auc"])
    src, card = cards[best_i]
    out = Path(out)
    # A shipped folder's history must survive a retrain: its changelog is carried over, with what was replaced.
    previous = ModelCard.from_json(out / "card.json") if (out / "card.json").exists() else None
    if previous is not None and previous.weights_sha256 != card.weights_sha256:
        prev_auc = previous.evaluation.get("overall", {}).get("metrics", {}).get("auc", {})
        card.changelog = previous.changelog + [
            f"{_dt.date.today().isoformat()}: replaced the previous weights (sha256 {previous.weights_sha256[:12]}, "
            f"CV AUC {prev_auc.get('value', float('nan')):.3f}, trained at commit {previous.git_commit or 'unknown'}) "
            "by a new run:"] + card.changelog
    if out.resolve() != src.resolve():
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
    card.model_id = f"{out.parent.name}/{out.name}"
    card.recipe["selection"] = {
        "rule": "highest pooled out-of-fold AUC among recipes run on the same outer folds (this choice makes the "
                "shipped model's CV estimate slightly optimistic)", "candidates": rows, "chosen": rows[best_i]["recipe"]}
    label = lambda r: f"{r['recipe']}, stain {r['stain']}"  # noqa: E731
    card.changelog.append(f"{_dt.date.today().isoformat()}: shipped the {label(rows[best_i])} recipe "
                          f"(CV AUC {rows[best_i]['auc']:.3f}) over " +
                          ", ".join(f"{label(r)} ({r['auc']:.3f})" for i, r in enumerate(rows) if i != best_i))
    card.to_json(out / "card.json")
    return card.recipe["selection"]
