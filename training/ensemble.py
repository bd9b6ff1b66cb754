"""`python -m training build-ensemble`: K runs of one `train` command on the same folds (different --train-seed)
become one served model (models.ensemble.SeedEnsemble). No run is selected or dropped: every run given is a member.

The ensemble's out-of-fold logit of a frame is the mean of the members' out-of-fold logits (each from the fold model
that never saw its patient); its out-of-fold probabilities are calibrated cross-fitted (each fold's temperature fitted
on the other folds' ensemble logits), and the shipped temperatures (pooled and per magnification) on all of them.
The ensemble is compared with the first run (the single run it replaces) by the paired patient bootstrap on the
same frames and folds.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from models.archs import file_sha256
from models.card import ALL, ModelCard
from models.metrics import apply_temperature, fit_temperature_guarded, paired_auc_difference, summarize
from training.case_policy import fit_temperatures
from training.train import apply_scores, git_commit, scores_from_predictions, versions

SEED_KEYS = ("seed", "train_seed")


def _recipe_key(card: ModelCard) -> dict:
    """What must be identical across members: everything about the recipe except the training seed."""
    # the training seed differs by design; eval_tta only adds 8-view scores to the evaluation, it trains nothing
    hp = {k: v for k, v in card.hyperparameters.items() if k not in ("train_seed", "eval_tta")}
    return {"architecture": card.architecture, "arch_config": card.arch_config, "magnification": card.magnification,
            "preprocess": card.to_dict()["preprocess"], "init": card.init.get("file_sha256") or card.init.get("init"),
            "hyperparameters": hp}


def read_runs(runs: list[str | Path]) -> tuple[list[ModelCard], list[pd.DataFrame]]:
    """The runs' cards and out-of-fold predictions, refused unless they are one recipe on identical folds with
    distinct training seeds."""
    cards = [ModelCard.from_json(Path(r) / "card.json") for r in runs]
    preds = [pd.read_csv(Path(r) / "predictions.csv", dtype={"patient": str}) for r in runs]
    if len(cards) < 2:
        raise ValueError("an ensemble needs at least two runs")
    key0 = _recipe_key(cards[0])
    for r, c in zip(runs[1:], cards[1:]):
        if _recipe_key(c) != key0:
            diff = [k for k in key0 if _recipe_key(c)[k] != key0[k]]
            raise ValueError(f"{r}: not the same recipe as {runs[0]} (differs in {diff})")
    seeds = [c.hyperparameters.get("train_seed", c.hyperparameters.get("seed")) for c in cards]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs share a training seed ({seeds}): members must differ in --train-seed")
    p0 = preds[0][["path", "cv_fold"]]
    for r, p in zip(runs[1:], preds[1:]):
        if list(p["path"]) != list(p0["path"]) or list(p["cv_fold"]) != list(p0["cv_fold"]):
            raise ValueError(f"{r}: its frames or folds differ from {runs[0]}'s (same --seed and data needed)")
    return cards, preds


def cross_fitted_probabilities(logit: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Each fold's frames calibrated by a temperature fitted on the other folds' logits (never on their own)."""
    p = np.full(len(logit), np.nan)
    notes = []
    for f in sorted(set(fold)):
        te = fold == f
        t, note = fit_temperature_guarded(logit[~te], y[~te])
        p[te] = apply_temperature(logit[te], t)
        notes.append({"fold": int(f), "temperature": t, "temperature_fit": note})
    return p, notes


def build_ensemble(runs: list[str | Path], out: str | Path, model_id: str | None = None, n_boot: int = 1000) -> dict:
    """Write the ensemble's model folder (members' weights, card, predictions, curves); returns its comparison."""
    t0 = time.time()
    out = Path(out)
    cards, preds = read_runs(runs)
    base = preds[0]
    y = base["label"].to_numpy(int)
    patients = base["patient"].astype(str).to_numpy()
    fold = base["cv_fold"].to_numpy(int)
    member_logits = np.stack([p["logit"].to_numpy(float) for p in preds])
    logit = member_logits.mean(0)
    p_oof, fold_temps = cross_fitted_probabilities(logit, y, fold)
    pooled, by_mag = fit_temperatures(logit, y, base["magnification"].to_numpy(), patients)

    out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (r, c) in enumerate(zip(runs, cards)):
        seed = c.hyperparameters.get("train_seed", c.hyperparameters.get("seed"))
        name = f"member{i}_train{seed}.safetensors"
        shutil.copyfile(Path(r) / c.weights_file, out / name)
        digest = file_sha256(out / name)
        if digest != c.weights_sha256:
            raise ValueError(f"{r}: weights do not match their card's sha256; not an ensemble member")
        m_auc = summarize(y, apply_temperature(member_logits[i], 1.0), patients, n_boot=0, score=member_logits[i])
        members.append({"weights_file": name, "weights_sha256": digest, "train_seed": seed, "source_run": str(r),
                        "source_model_id": c.model_id, "source_card_created": c.created,
                        "weights_dtype": c.weights_dtype, "oof_auc": m_auc["metrics"]["auc"]["value"],
                        "training_time_s": c.training_time_s})
    shutil.copyfile(Path(runs[0]) / cards[0].split_file, out / "split.csv")

    pred = base[["path", "patient", "label", "magnification", "source", "cv_fold", "part"]].copy()
    pred["logit"], pred["p_malignant"] = logit, p_oof
    if "p_baseline" in base:
        pred["p_baseline"] = base["p_baseline"]
    for i in range(len(runs)):
        pred[f"logit_member{i}"] = member_logits[i]
    for col in ("blur_variance", "tissue_fraction", "he_fraction", "qc_pass"):
        if col in base:
            pred[col] = base[col]
    pred.to_csv(out / "predictions.csv", index=False)

    vs_single = paired_auc_difference(y, logit, member_logits[0], patients, n_boot=2000, seed=0)
    vs_members = [paired_auc_difference(y, logit, member_logits[i], patients, n_boot=2000, seed=0)
                  for i in range(len(runs))]
    c0 = cards[0]
    k = len(runs)
    card = ModelCard(
        model_id=model_id or f"{c0.magnification}/{out.name}", architecture="seed_ensemble",
        magnification=c0.magnification, preprocess=c0.preprocess,
        init={**c0.init, "description": f"each of {k} members: {c0.init.get('description', c0.init.get('init'))}"},
        arch_config={"member_arch": c0.architecture, "member_config": c0.arch_config or None, "members": members},
        temperature=pooled, temperature_by_magnification=by_mag,
        weights_file=members[0]["weights_file"], weights_sha256=members[0]["weights_sha256"],
        weights_dtype=c0.weights_dtype,
        recipe={**c0.recipe, "ensemble": {
            "members": k, "combination": "mean of the members' logits",
            "selection": "none: every run of the command is a member",
            "member_training_seeds": [m["train_seed"] for m in members],
            "temperature_source": "pooled and per-magnification temperatures fitted on the ensemble's out-of-fold "
                                  "logits; the out-of-fold probabilities in predictions.csv are cross-fitted (each "
                                  "fold's temperature from the other folds)"}},
        hyperparameters={**c0.hyperparameters, "train_seed": [m["train_seed"] for m in members], "eval_tta": False},
        data=c0.data,
        evaluation={"protocol": (f"{fold.max() + 1}-fold stratified patient-grouped cross-validation of each of the "
                                 f"{k} members on the same folds, their out-of-fold logits averaged per frame "
                                 f"(split seed {c0.hyperparameters.get('seed')}), so each frame's ensemble logit "
                                 "comes from fold models that never saw its patient"),
                    "per_fold": [{**t, "test_patients": sorted(set(patients[fold == t["fold"]]))} for t in fold_temps],
                    "vs_single_run": {**vs_single, "single_run": str(runs[0]),
                                      "single_run_model_id": c0.model_id},
                    "vs_each_member": vs_members},
        per_magnification={}, baseline=dict(c0.baseline), training_log=[],
        training_time_s=round(sum(m["training_time_s"] for m in members) + time.time() - t0, 1),
        versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        limitations=[*c0.limitations, f"A seed ensemble: {k} forward passes per frame (about {k}x the single "
                                      "model's inference time)."],
        changelog=[f"{_dt.date.today().isoformat()}: built by `python -m training build-ensemble` from {k} runs "
                   f"({', '.join(str(r) for r in runs)})"],
    )
    apply_scores(card, scores_from_predictions(pred, c0.magnification == ALL, n_boot, 0), out)
    card.to_json(out / "card.json")
    return {"model_id": card.model_id, "members": [{k_: m[k_] for k_ in ("weights_file", "train_seed", "oof_auc")}
                                                   for m in members],
            "auc": card.evaluation["overall"]["metrics"]["auc"], "vs_single_run": vs_single,
            "temperature": pooled, "temperature_by_magnification": by_mag}


def rule1_record(folder: str | Path, out: str | Path, n_boot: int = 1000) -> dict:
    """The ensemble's rule-1 record in the repeats-cv layout (what Compare and the README read): its one split seed's
    out-of-fold figures with patient-bootstrap CIs, per-fold spread, and the paired difference to its single run.
    Rule 1 asks for 3 split seeds; the shortfall is declared beside the figure (the folder's evidence.json, models.evidence)."""
    import json

    folder = Path(folder)
    card = ModelCard.from_json(folder / "card.json")
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str})
    y, pats, z = pred["label"].to_numpy(int), pred["patient"].to_numpy(), pred["logit"].to_numpy(float)
    s = summarize(y, pred["p_malignant"].to_numpy(float), pats, n_boot=n_boot, score=z)
    folds = [summarize(y[m], pred["p_malignant"].to_numpy(float)[m], pats[m], n_boot=0, score=z[m])["metrics"]["auc"]["value"]
             for m in (pred["cv_fold"].to_numpy() == f for f in sorted(pred["cv_fold"].unique()))]
    folds = np.array([f for f in folds if f is not None and np.isfinite(f)], float)
    member_aucs = [m["oof_auc"] for m in card.arch_config["members"]]
    split_seed = card.hyperparameters.get("seed", 0)
    by_mag = {g: summarize(y[m], pred["p_malignant"].to_numpy(float)[m], pats[m], n_boot=0, score=z[m])["metrics"]["auc"]["value"]
              for g, m in ((g, pred["magnification"].to_numpy() == g) for g in sorted(pred["magnification"].unique()))}
    rec = {"seeds": [split_seed], "magnification": card.magnification,
           "folds_with_temperature_fallback": "none (cross-fitted temperatures)",
           "training_seed_spread": {str(split_seed): {"train_seeds": [m["train_seed"] for m in card.arch_config["members"]],
                                                      "pooled_auc": member_aucs, "sd": float(np.std(member_aucs, ddof=1))}},"protocol": (f"the seed ensemble ({len(card.arch_config['members'])} training seeds) on split seed "
                        f"{card.hyperparameters.get('seed')} only: 5 stratified patient-grouped folds; split seeds 1-2 "
                        "would need 3 more full runs each"),
           "model_id": card.model_id, "runs": [m["source_run"] for m in card.arch_config["members"]],
           "recipe": {"summary": {k: s["metrics"][k] for k in ("auc", "patient_auc", "patient_accuracy",
                                                               "balanced_accuracy")},
                      "pooled_auc_by_seed": [s["metrics"]["auc"]["value"]],
                      "per_fold_auc_mean": float(folds.mean()), "per_fold_auc_sd": float(folds.std(ddof=1)),
                      "per_fold_auc_min": float(folds.min()), "per_fold_auc_max": float(folds.max()),
                      "n_patients": s["n_patients"], "per_magnification_auc": by_mag,
                      "vs_incumbent": card.evaluation.get("vs_single_run")},
           "vs_single_run": card.evaluation.get("vs_single_run")}
    Path(out).write_text(json.dumps(rec, indent=1) + "\n")
    return rec
