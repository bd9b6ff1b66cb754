"""The `train` command: patient-grouped CV (or a train/val/test split), final model, card and curves."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from models.archs import ARCHITECTURES, arch_spec, build_model, file_sha256, hybrid_config
from models.card import ALL, ModelCard, PreprocessConfig
from models.config import lite2_weights
from models.metrics import apply_temperature, curve_points, fold_figures, fit_temperature, fit_temperature_guarded, summarize
from training.data import IndexResult, default_cache_dir, index_source
from training.engine import (FitConfig, cache_images, cached_features, fit_logistic_head, predict_logits, quality_table,
                             select_compute)
from training.hybrid import HybridConfig
from training.recipes import HybridRecipe, NetworkRecipe, Recipe, TrainingSet
from training.splits import assert_patient_disjoint, grouped_kfold, patient_split, write_split_csv

log = logging.getLogger("training")
BASELINE_WEIGHTS = lite2_weights()  # models.config: BREAKHIS_LITE2_WEIGHTS or ../shared/weights


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        return ""


def versions() -> dict:
    import sklearn
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def select_rows(index: IndexResult, magnification: str) -> pd.DataFrame:
    df = index.frame
    if magnification != ALL:
        df = df[df["magnification"] == magnification]
    if df.empty:
        raise ValueError(f"no images at magnification {magnification}")
    return df.reset_index(drop=True)


def counts(df: pd.DataFrame) -> dict:
    """Images and patients per class, for provenance."""
    out = {}
    for lab in ("benign", "malignant"):
        d = df[df["label"] == lab]
        out[lab] = {"images": int(len(d)), "patients": int(d["patient"].nunique())}
    return out


def inner_split(df: pd.DataFrame, seed: int) -> pd.Series:
    """Train/val inside a training set (patient-wise), for early stopping and temperature."""
    return patient_split(df, val=0.2, test=0.0, seed=seed)


def baseline_probs(feats: np.ndarray, y: np.ndarray, w: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Frozen-feature logistic regression (C=1, standardised features, same class/patient weights)."""
    weight, bias = fit_logistic_head(feats, y, w, tr)
    return 1.0 / (1.0 + np.exp(-(feats[te] @ weight + bias)))


def scores_from_predictions(pred: pd.DataFrame, pooled: bool, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every reported figure from the saved out-of-fold predictions (so `rescore` reproduces a card).

    Threshold/calibration metrics use calibrated p_malignant; AUC and ROC/PR rank by the raw logit.
    """
    pred = pred[pred["p_malignant"].notna()]
    y, pats = pred["label"].to_numpy(int), pred["patient"].astype(str).to_numpy()
    has_base = "p_baseline" in pred and pred["p_baseline"].notna().all()

    def summ(rows: np.ndarray, col: str, score: str) -> dict:
        return summarize(y[rows], pred[col].to_numpy()[rows], pats[rows], n_boot=n_boot, seed=seed,
                         score=pred[score].to_numpy()[rows])

    every = np.ones(len(pred), bool)
    mags = sorted(pred["magnification"].unique()) if pooled else []
    by_mag = {g: (pred["magnification"] == g).to_numpy() for g in mags}
    out = {"overall": summ(every, "p_malignant", "logit"),
           "per_magnification": {g: summ(r, "p_malignant", "logit") for g, r in by_mag.items()},
           "curves": {"overall": curve_points(y, pred["p_malignant"], score=pred["logit"]),
                      "per_magnification": {g: curve_points(y[r], pred["p_malignant"][r], score=pred["logit"][r])
                                            for g, r in by_mag.items()}}}
    if has_base:
        out["baseline"] = {"overall": summ(every, "p_baseline", "p_baseline"),
                           "per_magnification": {g: summ(r, "p_baseline", "p_baseline") for g, r in by_mag.items()}}
        out["curves"]["baseline"] = curve_points(y, pred["p_baseline"])
    if "logit_tta" in pred and pred["logit_tta"].notna().all():
        out["tta"] = {"overall": summ(every, "p_tta", "logit_tta"),
                      "per_magnification": {g: summ(r, "p_tta", "logit_tta") for g, r in by_mag.items()}}
    if "qc_pass" in pred:
        ok_qc = pred["qc_pass"].astype(bool).to_numpy()
        out["qc"] = {"rule": "frames failing any thresholded check of models.quality (blur, tissue, H&E colour) "
                             "left out", "n_failing": int((~ok_qc).sum()), "n_images": int(len(ok_qc)),
                     "all_frames": out["overall"],
                     "qc_passed_only": summ(ok_qc, "p_malignant", "logit") if ok_qc.any() else None}
    if "source" in pred:
        src = pred["source"].astype(str).str.split("@").str[0].to_numpy()
        ok = (pred["p_malignant"].to_numpy() >= 0.5).astype(int) == y
        out["accuracy_by_source_repository"] = {s_: float(ok[src == s_].mean()) for s_ in sorted(set(src))}
    return out


def apply_scores(card: ModelCard, sc: dict, folder: Path) -> None:
    """Write scores_from_predictions' output into a card and curves.json."""
    card.evaluation["overall"] = sc["overall"]
    if "accuracy_by_source_repository" in sc:
        card.evaluation["accuracy_by_source_repository"] = sc["accuracy_by_source_repository"]
    card.per_magnification = sc["per_magnification"]
    for key in ("tta", "qc"):
        if key in sc:
            card.evaluation[key] = sc[key]
    if "baseline" in sc:
        card.baseline.update(sc["baseline"])
    (folder / "curves.json").write_text(json.dumps(sc["curves"]))


def load_training_set(data: str, magnification: str, cfg: PreprocessConfig, compute, cache_dir: Path,
                      stain: str = "none") -> tuple[TrainingSet, IndexResult, list]:
    """Index the data, decode every frame at this magnification once (fitting stain targets first if asked)."""
    index = index_source(data, cache_dir)
    log.info(index.summary())
    df = select_rows(index, magnification)
    if stain and stain != "none":
        # Targets from every training frame (label-free). In CV the held-out patients' frames also contribute to
        # these colour statistics (never their labels); the card says so.
        from models.stain import fit_stain

        cfg.stain = fit_stain(stain, cache_images(df, cfg, cache_dir)[0])
        cfg.stain["fitted_on"] = ("every training frame (label-free colour statistics; in cross-validation the "
                                  "held-out frames' colours contribute too)")
    images, keep, bad = cache_images(df, cfg, cache_dir)
    return TrainingSet(df.iloc[keep].reset_index(drop=True), images, cfg, compute, cache_dir), index, index.skipped + bad


@dataclass
class Scores:
    """Out-of-fold (or held-out test) predictions of every frame, and of other magnifications' frames."""

    n: int
    n_other: int
    eval_tta: bool

    def __post_init__(self) -> None:
        nan = lambda k: np.full(k, np.nan)  # noqa: E731
        self.logit, self.p, self.logit_tta, self.p_tta, self.p_base = (nan(self.n) for _ in range(5))
        self.fold = np.full(self.n, -1)
        self.o_logit, self.o_p, self.o_logit_tta, self.o_p_tta = (nan(self.n_other) for _ in range(4))
        self.o_by = np.full(self.n_other, "", object)


@dataclass
class OtherFrames:
    """A single-magnification model's cross-magnification check: the other magnifications' frames."""

    df: pd.DataFrame
    images: torch.Tensor | None
    patients: np.ndarray

    @classmethod
    def load(cls, index: IndexResult, magnification: str, cfg: PreprocessConfig, enabled: bool) -> "OtherFrames":
        other = pd.DataFrame()
        if enabled and magnification != ALL:
            other = index.frame[index.frame["magnification"] != magnification].reset_index(drop=True)
        if not len(other):
            return cls(other, None, np.zeros(0, str))
        images, keep, _ = cache_images(other, cfg)
        other = other.iloc[keep].reset_index(drop=True)
        return cls(other, images, other["patient"].astype(str).to_numpy())

    def of_patients(self, patients) -> np.ndarray:
        return np.flatnonzero(np.isin(self.patients, list(set(patients))))


def score_frames(model, recipe: Recipe, res, data: TrainingSet, sc: Scores, idx: np.ndarray, temp: float,
                 temp_tta: float | None) -> None:
    """Predictions of frames `idx` by a model that never saw their patients: raw logit, calibrated p, and TTA."""
    z = predict_logits(model, data.images, data.cfg, idx)
    sc.logit[idx], sc.p[idx] = z, apply_temperature(z, temp)
    if sc.eval_tta:
        zt = recipe.tta_logits(model, res, data, idx)
        sc.logit_tta[idx], sc.p_tta[idx] = zt, apply_temperature(zt, temp_tta)


def score_other(model, data: TrainingSet, other: OtherFrames, sc: Scores, idx: np.ndarray, temp: float,
                temp_tta: float | None, by: str) -> None:
    """Other magnifications' frames of patients this model never saw: plain and, with --tta-eval, 8 views."""
    if not len(idx):
        return
    zo = predict_logits(model, other.images, data.cfg, idx)
    sc.o_logit[idx], sc.o_p[idx], sc.o_by[idx] = zo, apply_temperature(zo, temp), by
    if sc.eval_tta:
        zot = predict_logits(model, other.images, data.cfg, idx, tta=True)
        sc.o_logit_tta[idx], sc.o_p_tta[idx] = zot, apply_temperature(zot, temp_tta)


def fit_with_inner_validation(recipe: Recipe, data: TrainingSet, train_idx: np.ndarray, seed: int, desc: str,
                              eval_tta: bool, train_seed: int | None = None):
    """Fit on a training set's inner-train patients; early stopping and the (guarded) temperature come from its
    inner-validation patients. `seed` draws the inner split, `train_seed` (default: `seed`) the network's init."""
    part = inner_split(data.df.iloc[train_idx], seed).to_numpy()
    tr, va = train_idx[part == "train"], train_idx[part == "val"]
    train_seed = seed if train_seed is None else train_seed
    model = recipe.fresh_model(train_seed)
    res = recipe.fit(model, data, tr, va, train_seed, desc)
    model.load_state_dict(res.state)
    temp, res.temperature_note = fit_temperature_guarded(res.val_logits, data.y[va])
    temp_tta = fit_temperature_guarded(recipe.tta_logits(model, res, data, va, twin=True), data.y[va])[0] if eval_tta else None
    return model, res, temp, temp_tta, va


def cross_validate(recipe: Recipe, data: TrainingSet, other: OtherFrames, sc: Scores, k: int, seed: int,
                   b_feats: np.ndarray | None, train_seed: int | None = None) -> list[dict]:
    """Stratified patient-grouped k-fold CV: every frame is scored by the fold model that never saw its patient.
    `seed` draws the folds; fold f's network starts from `train_seed` + f (default `seed` + f), so training seeds
    can vary on fixed folds."""
    train_seed = seed if train_seed is None else train_seed
    y, patients = data.y, data.patients
    sc.fold = grouped_kfold(data.df, k, seed).to_numpy()
    per_fold = []
    for f in range(sc.fold.max() + 1):
        te, trv = np.flatnonzero(sc.fold == f), np.flatnonzero(sc.fold != f)
        assert_patient_disjoint(pd.Series(patients[np.r_[trv, te]]),
                                pd.Series(["train"] * len(trv) + ["test"] * len(te)))
        model, res, temp, temp_tta, va = fit_with_inner_validation(recipe, data, trv, seed + f, f"fold{f}", sc.eval_tta,
                                                                   train_seed + f)
        score_frames(model, recipe, res, data, sc, te, temp, temp_tta)
        score_other(model, data, other, sc, other.of_patients(patients[te]), temp, temp_tta,
                    f"fold {f} model (patient held out)")
        if b_feats is not None:
            sc.p_base[te] = baseline_probs(b_feats, y, data.weights, trv, te)
        per_fold.append({"fold": f, "test_patients": sorted(set(patients[te])), "val_patients": sorted(set(patients[va])),
                         "temperature": temp, "temperature_fit": res.temperature_note,
                         "temperature_tta": temp_tta, "val_auc": res.val_auc,
                         "phase_chosen": res.phase_chosen, "phases": res.phases,
                         "best_epoch": res.best_epoch, "best_head_epoch": res.best_head_epoch, "log": res.log,
                         **fold_figures(y[te], sc.p[te], patients[te])})
    return per_fold


def refit(recipe: Recipe, data: TrainingSet, sc: Scores, per_fold: list[dict], seed: int):
    """The shipped model: every patient, the schedule the folds chose (no validation patients wasted), calibrated
    by a temperature fitted on the pooled out-of-fold logits."""
    final_recipe, schedule = recipe.for_refit(per_fold)
    model = final_recipe.fresh_model(seed)
    res = final_recipe.fit(model, data, np.arange(len(data.df)), np.array([], int), seed, "final")
    model.load_state_dict(res.state)
    return model, res, *pooled_temperatures(data, sc), {**schedule, "temperature_source": POOLED_TEMPERATURE}


POOLED_TEMPERATURE = "fitted on the pooled out-of-fold logits of the fold models"


def pooled_temperatures(data: TrainingSet, sc: Scores) -> tuple[float, float | None]:
    """The card's temperatures (plain and, with --tta-eval, TTA) from the fold models' pooled out-of-fold logits."""
    temp = fit_temperature_guarded(sc.logit, data.y)[0]
    return temp, fit_temperature_guarded(sc.logit_tta, data.y)[0] if sc.eval_tta else None


def hold_out(recipe: Recipe, data: TrainingSet, other: OtherFrames, sc: Scores, part: np.ndarray, seed: int,
             b_feats: np.ndarray | None):
    """One patient-wise train/val/test split: the test patients' frames are scored by the one model."""
    tr, va, te = (np.flatnonzero(part == s) for s in ("train", "val", "test"))
    model = recipe.fresh_model(seed)
    res = recipe.fit(model, data, tr, va, seed, "split")
    model.load_state_dict(res.state)
    temp = fit_temperature(res.val_logits, data.y[va])
    temp_tta = fit_temperature(predict_logits(model, data.images, data.cfg, va, tta=True), data.y[va]) if sc.eval_tta else None
    score_frames(model, recipe, res, data, sc, te, temp, temp_tta)
    score_other(model, data, other, sc, other.of_patients(data.patients[te]), temp, temp_tta, "model (test patient)")
    if b_feats is not None:
        sc.p_base[te] = baseline_probs(b_feats, data.y, data.weights, np.concatenate([tr, va]), te)
    return model, res, temp, temp_tta, {"source": "early stopping on validation patients",
                                        "temperature_source": "validation patients"}


def baseline_features(data: TrainingSet, baseline_init: str | None) -> np.ndarray | None:
    """Frozen ImageNet Lite2 features for the baseline (logistic regression on the very same folds); the
    content-keyed store makes this free when the model under training is that same backbone."""
    b_init = baseline_init or (str(BASELINE_WEIGHTS) if BASELINE_WEIGHTS.is_file() else None)
    if not b_init:
        return None
    bspec = ARCHITECTURES["efficientnet_lite2"]
    bcfg = PreprocessConfig(input_size=bspec.input_size, mean=bspec.mean, std=bspec.std)
    bmodel, _ = build_model("efficientnet_lite2", b_init)
    bimages = data.images if bcfg == data.cfg else cache_images(data.df, bcfg, data.cache_dir)[0]
    return cached_features(bmodel, bimages, bcfg, data.cache_dir)


def write_folder(out: Path, data: TrainingSet, other: OtherFrames, sc: Scores, part: np.ndarray, model, temp: float,
                 temp_tta: float | None, n_boot: int, seed: int) -> tuple[pd.DataFrame, dict | None]:
    """Weights (fp16 safetensors), split.csv, predictions.csv and the cross-magnification predictions."""
    out.mkdir(parents=True, exist_ok=True)
    write_split_csv(data.df.assign(part=part, cv_fold=sc.fold), out / "split.csv", ["part", "cv_fold"])
    if model is not None:  # None: a --cv-only run, which has no final model to save or to score unseen patients with
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        score_other(model, data, other, sc, np.flatnonzero(~np.isin(other.patients, list(set(data.patients)))), temp,
                    temp_tta, "final model (patient has no frame at this magnification: never seen)")
    else:
        (out / "model.safetensors").unlink(missing_ok=True)  # never leave an older run's weights beside this card
    df = data.df
    pred = pd.DataFrame({"path": df["path"], "patient": data.patients, "label": data.y,
                         "magnification": df["magnification"], "source": df["source"], "cv_fold": sc.fold, "part": part,
                         "logit": sc.logit, "p_malignant": sc.p, "p_baseline": sc.p_base})
    if sc.eval_tta:
        pred["logit_tta"], pred["p_tta"] = sc.logit_tta, sc.p_tta
    pred = pd.concat([pred, quality_table(df["path"].tolist())], axis=1)
    pred.to_csv(out / "predictions.csv", index=False)
    if not len(other.df):
        return pred, None
    o = other.df
    xm = pd.DataFrame({"path": o["path"], "patient": other.patients, "label": (o["label"] == "malignant").astype(int),
                       "magnification": o["magnification"], "logit": sc.o_logit, "p_malignant": sc.o_p,
                       "predicted_by": sc.o_by})
    if sc.eval_tta:
        xm["logit_tta"], xm["p_tta"] = sc.o_logit_tta, sc.o_p_tta
    xm = xm[xm["logit"].notna()]
    xm.to_csv(out / "predictions_cross_magnification.csv", index=False)
    return pred, cross_magnification_scores(xm, n_boot, seed)


def run_train(data: str, magnification: str, arch: str, init: str, out: Path, fc: FitConfig, cv: int = 5,
              seed: int = 0, n_boot: int = 1000, cache_dir: Path | None = None, model_id: str | None = None,
              baseline_init: str | None = None, force_fp32: bool = False, limitations: list[str] | None = None,
              arch_config: dict | None = None, vit_init: str | None = None, stain: str = "none", eval_tta: bool = False,
              hc: HybridConfig | None = None, cross_magnification: bool = True,
              train_seed: int | None = None, refit_final: bool = True) -> ModelCard:
    """Cross-validate (or hold out), refit on all patients, and write the model folder with its card. `seed` draws
    the folds and splits; `train_seed` (default `seed`) the networks' init and data order. refit_final=False (CV
    only) writes the out-of-fold evaluation without a final model: a rule-1 repeat needs only the fold models'
    predictions, and the refit is a sixth of a run."""
    if train_seed is not None:
        fc = replace(fc, seed=train_seed)  # the fit's data order and augmentation follow the training seed too
    train_seed = seed if train_seed is None else train_seed
    t_start = time.time()
    out = Path(out)
    arch_config = hybrid_config(arch_config, vit_init) if arch == "hybrid" else {}
    cache_dir = Path(cache_dir or default_cache_dir())
    compute = select_compute(force_fp32)
    log.info("compute: %s", compute.reason)
    spec = arch_spec(arch, arch_config)
    cfg = PreprocessConfig(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    from training import distributed

    with distributed.main_first():  # under torchrun rank 0 fills the frame cache, the others read it
        ts, index, skipped = load_training_set(data, magnification, cfg, compute, cache_dir, stain)
    df = ts.df
    _, init_record = build_model(arch, init, arch_config or None, vit_init)  # provenance; every fit builds its own
    recipe: Recipe = (HybridRecipe(arch, init, arch_config, vit_init, hc=hc or HybridConfig(seed=train_seed)) if arch == "hybrid"
                      else NetworkRecipe(arch, init, arch_config, vit_init, fc=fc))
    with distributed.main_first():
        other = OtherFrames.load(index, magnification, cfg, cross_magnification)
        b_feats = baseline_features(ts, baseline_init)
    sc = Scores(len(df), len(other.df), eval_tta)
    per_fold: list[dict] = []
    if cv and cv > 1:
        per_fold = cross_validate(recipe, ts, other, sc, cv, seed, b_feats, train_seed)
        protocol = (f"{sc.fold.max() + 1}-fold stratified patient-grouped cross-validation; out-of-fold predictions "
                    "of patients never seen by their fold's model are the test set; temperature fitted per fold on "
                    "inner validation patients")
        if refit_final:
            final_model, final_res, final_temp, temp_tta_final, schedule = refit(recipe, ts, sc, per_fold, train_seed)
        else:
            final_model = final_res = None
            final_temp, temp_tta_final = pooled_temperatures(ts, sc)
            schedule = {"source": "none: --cv-only run (out-of-fold evaluation only; no final model, nothing to serve)",
                        "temperature_source": POOLED_TEMPERATURE}
        part = np.full(len(df), "train")
    else:
        part = patient_split(df, val=0.15, test=0.15, seed=seed).to_numpy()
        protocol = "single patient-wise train/val/test split (15% of patients per label in val and in test)"
        final_model, final_res, final_temp, temp_tta_final, schedule = hold_out(recipe, ts, other, sc, part, train_seed, b_feats)
    assert_patient_disjoint(pd.Series(ts.patients), pd.Series(sc.fold if cv and cv > 1 else part))
    rank, world_size = distributed.world()
    if rank != 0:  # only rank 0 writes the model folder and the card
        distributed.barrier()
        return None
    pred, cross = write_folder(out, ts, other, sc, part, final_model, final_temp, temp_tta_final, n_boot, seed)

    evaluation = {"protocol": protocol, "per_fold": per_fold}
    if cross is not None:
        evaluation["cross_magnification"] = cross
    baseline = ({"description": "frozen ImageNet EfficientNet-Lite2 features + logistic regression (C=1), same folds"}
                if b_feats is not None else {})
    hybrid = arch == "hybrid"
    card = ModelCard(
        model_id=model_id or f"{magnification}/{out.name}", architecture=arch, magnification=magnification,
        preprocess=cfg, init=init_record, arch_config=arch_config,
        temperature=final_temp,
        weights_sha256=file_sha256(out / "model.safetensors") if final_model is not None else "",
        recipe={"name": recipe.name, "final_model_schedule": schedule,
                "compute": compute.reason, **({"phases_per_fold": [f["phases"] for f in per_fold]} if hybrid else {}),
                "phases_chosen_by_fold_validation": [f["phase_chosen"] for f in per_fold] or [final_res.phase_chosen]},
        # (per_fold is never empty without a final model: --cv-only needs --cv > 1)
        hyperparameters=recipe.hyperparameters() | {"cv_folds": cv, "seed": seed, "train_seed": train_seed, "stain": stain, "eval_tta": eval_tta,
                                                     "world_size": world_size},
        data={"source": str(data), "magnification": magnification, "all": counts(df),
              "final_model": {"train": counts(df[part == "train"]), "val": counts(df[part == "val"]),
                              **({"test": counts(df[part == "test"])} if (part == "test").any() else {})},
              "skipped": [{"path": p, "reason": r} for p, r in skipped]},
        evaluation=evaluation, per_magnification={}, baseline=baseline,
        training_log=final_res.log if final_res is not None else [],
        training_time_s=round(time.time() - t_start, 1), versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        limitations=(limitations or []) + [
            f"Trained and evaluated on {df['patient'].nunique()} patients "
            f"({counts(df)['benign']['patients']} benign, {counts(df)['malignant']['patients']} malignant): "
            "confidence intervals are wide and the figures may not transfer to other labs or scanners.",
            "Frame-level model: it sees one 700x460 field of view, not a whole slide.",
        ],
        changelog=[f"{_dt.date.today().isoformat()}: trained by `python -m training train`"],
    )
    apply_scores(card, scores_from_predictions(pred, magnification == ALL, n_boot, seed), out)
    card.to_json(out / "card.json")
    distributed.barrier()
    return card


def cross_magnification_scores(xm: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of a single-magnification model on frames of patients it never saw, at each other magnification."""
    out = {"protocol": "frames at other magnifications of patients held out by the fold models (or never seen by "
                       "any model); see predictions_cross_magnification.csv"}
    for g, d in xm.groupby("magnification"):
        out[str(g)] = summarize(d["label"].to_numpy(int), d["p_malignant"].to_numpy(), d["patient"].astype(str).to_numpy(),
                                n_boot=n_boot, seed=seed, score=d["logit"].to_numpy())
        if "logit_tta" in d and d["logit_tta"].notna().all():  # the same fold models, 8 dihedral views averaged
            out[str(g)]["tta"] = summarize(d["label"].to_numpy(int), d["p_tta"].to_numpy(), d["patient"].astype(str).to_numpy(),
                                           n_boot=n_boot, seed=seed, score=d["logit_tta"].to_numpy())
    return out


def rescore(folder: str | Path, n_boot: int = 1000, seed: int = 0) -> ModelCard:
    """Recompute a card's figures from its predictions.csv (same code path as training)."""
    folder = Path(folder)
    card = ModelCard.from_json(folder / "card.json")
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str})
    if "qc_pass" not in pred and all(Path(p).is_file() for p in pred["path"]):
        # cards from before QC was recorded: measure the frames now (QC depends on the image only)
        pred = pd.concat([pred, quality_table(pred["path"].tolist())], axis=1)
        pred.to_csv(folder / "predictions.csv", index=False)
    guard_temperatures(card, pred)
    pred.to_csv(folder / "predictions.csv", index=False)
    apply_scores(card, scores_from_predictions(pred, card.magnification == ALL, n_boot, seed), folder)
    xm_path = folder / "predictions_cross_magnification.csv"
    if xm_path.is_file():
        card.evaluation["cross_magnification"] = cross_magnification_scores(
            pd.read_csv(xm_path, dtype={"patient": str}), n_boot, seed)
    card.changelog.append(f"{_dt.date.today().isoformat()}: figures recomputed from predictions.csv by "
                          "`python -m training rescore` (AUC ranks raw out-of-fold logits)")
    card.to_json(folder / "card.json")
    return card



def guard_temperatures(card: ModelCard, pred: pd.DataFrame) -> None:
    """Apply the temperature guard to a card trained before it existed: a fold whose recorded temperature sits on
    a search bound falls back to the default, and its out-of-fold probabilities are recomputed from the saved
    logits (AUC, which ranks raw logits, is unchanged; calibration and threshold metrics may move)."""
    from models.metrics import TEMPERATURE_FALLBACK, temperature_on_bound as on_bound

    for f in card.evaluation.get("per_fold", []):
        if "temperature_fit" in f or "temperature" not in f:
            continue
        t = f["temperature"]
        if on_bound(t):
            rows = pred["cv_fold"] == f["fold"]
            pred.loc[rows, "p_malignant"] = apply_temperature(pred.loc[rows, "logit"].to_numpy(), TEMPERATURE_FALLBACK)
            f["temperature"], f["temperature_fit"] = TEMPERATURE_FALLBACK, f"fit landed on its bound ({t:.3g}): fallback 1.0"
        else:
            f["temperature_fit"] = "fitted"
    if on_bound(card.temperature):
        card.changelog.append(f"shipped temperature {card.temperature:.3g} sat on a bound: fallback 1.0")
        card.temperature = TEMPERATURE_FALLBACK
