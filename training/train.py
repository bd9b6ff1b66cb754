"""The `train` command: patient-grouped CV (or a train/val/test split), final model, card and curves."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from models.archs import ARCHITECTURES, arch_spec, build_model, file_sha256, hybrid_config
from models.card import ALL, ModelCard, PreprocessConfig
from models.config import lite2_weights
from models.metrics import apply_temperature, curve_points, fit_temperature, fit_temperature_guarded, summarize
from training.data import IndexResult, default_cache_dir, index_source
from training.engine import (FitConfig, cache_images, cached_features, fit, fit_logistic_head, predict_logits,
                             quality_table, sample_weights, select_compute, state_sha256)
from training.hybrid import HybridConfig, cached_feature_maps, final_schedule, fit_hybrid
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


def run_train(data: str, magnification: str, arch: str, init: str, out: Path, fc: FitConfig, cv: int = 5,
              seed: int = 0, n_boot: int = 1000, cache_dir: Path | None = None, model_id: str | None = None,
              baseline_init: str | None = None, force_fp32: bool = False, limitations: list[str] | None = None,
              arch_config: dict | None = None, vit_init: str | None = None, stain: str = "none", eval_tta: bool = False,
              hc: HybridConfig | None = None, cross_magnification: bool = True) -> ModelCard:
    """Cross-validate (or hold out), refit on all patients, and write the model folder with its card."""
    t_start = time.time()
    hybrid = arch == "hybrid"
    hc = hc or HybridConfig(seed=seed)
    arch_config = hybrid_config(arch_config, vit_init) if hybrid else {}
    cache_dir = Path(cache_dir or default_cache_dir())
    compute = select_compute(force_fp32)
    log.info("compute: %s", compute.reason)
    index = index_source(data, cache_dir)
    log.info(index.summary())
    df = select_rows(index, magnification)
    spec = arch_spec(arch, arch_config)
    cfg = PreprocessConfig(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    if stain and stain != "none":
        # Targets from every training frame (label-free). In CV the held-out patients' frames also contribute to
        # these colour statistics (never their labels); the card says so.
        from models.stain import fit_stain

        cfg.stain = fit_stain(stain, cache_images(df, cfg)[0])
        cfg.stain["fitted_on"] = ("every training frame (label-free colour statistics; in cross-validation the "
                                  "held-out frames' colours contribute too)")
    images, keep, bad = cache_images(df, cfg)
    skipped = index.skipped + bad
    df = df.iloc[keep].reset_index(drop=True)
    y = (df["label"] == "malignant").astype(int).to_numpy()
    patients = df["patient"].astype(str).to_numpy()

    _, init_record = build_model(arch, init, arch_config or None, vit_init)  # provenance; folds build their own
    needs_feats = fc.recipe in ("logreg", "linear", "finetune") and not hybrid
    maps_memo: dict[str, torch.Tensor] = {}

    def feats_of(model, tta: bool = False) -> np.ndarray | None:
        """Frozen features of this very network (content-keyed disk cache: a pretrained backbone is computed once;
        each scratch-initialised fold model gets its own)."""
        return cached_features(model, images, cfg, cache_dir, tta=tta) if needs_feats else None

    def fmaps_of(model) -> torch.Tensor | None:
        """The hybrid's frozen CNN feature maps, from this very network's CNN branch."""
        if not hybrid:
            return None
        key = state_sha256(model.backbone)
        if key not in maps_memo:
            maps_memo.clear()  # one network's maps at a time: they are large
            maps_memo[key] = cached_feature_maps(model, images, cfg)
        return maps_memo[key]

    # logreg + TTA: the head is linear on pooled features, so the 8-view mean logit is the head applied to the
    # 8-view mean feature: one cached pass instead of 8 forwards per fold.
    tta_by_features = eval_tta and fc.recipe == "logreg" and not hybrid

    def tta_logits_of(model, res, idx: np.ndarray, twin: bool = False) -> np.ndarray:
        if not tta_by_features:
            return predict_logits(model, images, cfg, idx, tta=True)
        if twin:
            w_, b_ = res.twin_head
        else:
            w_, b_ = model.fc.weight.detach().double().numpy()[0], float(model.fc.bias.detach())
        return feats_of(model, tta=True)[idx].astype(np.float64) @ w_ + b_
    # Baseline: frozen ImageNet Lite2 features + logistic regression, on the very same folds (the content-keyed
    # cache makes this free when the model under training is that same backbone).
    b_init = baseline_init or (str(BASELINE_WEIGHTS) if BASELINE_WEIGHTS.is_file() else None)
    b_feats = None
    if b_init:
        bspec = ARCHITECTURES["efficientnet_lite2"]
        bcfg = PreprocessConfig(input_size=bspec.input_size, mean=bspec.mean, std=bspec.std)
        bmodel, brec = build_model("efficientnet_lite2", b_init)
        bimages = images if bcfg == cfg else cache_images(df, bcfg)[0]
        b_feats = cached_features(bmodel, bimages, bcfg, cache_dir)
    w = sample_weights(y, patients)

    def fresh_model(seed_: int):
        # Seed before building: a scratch (or scratch-ViT) initialisation is drawn from the global torch RNG, which
        # earlier folds and evaluation options consume; unseeded, the same command gave different fold models.
        torch.manual_seed(seed_)
        return build_model(arch, init, arch_config or None, vit_init)[0]

    def one_fit(train_df_idx: np.ndarray, seed_: int, desc: str):
        sub = df.iloc[train_df_idx]
        part = inner_split(sub, seed_).to_numpy()
        tr, va = train_df_idx[part == "train"], train_df_idx[part == "val"]
        model = fresh_model(seed_)
        if hybrid:
            res = fit_hybrid(model, arch_config, images, fmaps_of(model), y, patients, tr, va, cfg, replace(hc, seed=seed_), compute, desc)
        else:
            res = fit(model, arch, images, feats_of(model), y, patients, tr, va, cfg, fc, compute, desc)
        model.load_state_dict(res.state)
        temp, temp_note = fit_temperature_guarded(res.val_logits, y[va])
        temp_tta = fit_temperature_guarded(tta_logits_of(model, res, va, twin=True), y[va])[0] if eval_tta else None
        res.temperature_note = temp_note
        return model, res, temp, tr, va, temp_tta

    # Cross-magnification check for a single-magnification model: its fold models also predict the held-out
    # patients' frames at the other magnifications; patients with no frame at this magnification were never
    # seen by any model here, and the final model predicts theirs.
    other = pd.DataFrame()
    if cross_magnification and magnification != ALL:
        other = index.frame[index.frame["magnification"] != magnification].reset_index(drop=True)
    o_images, o_keep = (cache_images(other, cfg)[:2] if len(other) else (None, np.zeros(0, int)))
    other = other.iloc[o_keep].reset_index(drop=True) if len(other) else other
    o_logit, o_p, o_by = np.full(len(other), np.nan), np.full(len(other), np.nan), np.full(len(other), "", object)
    o_logit_tta, o_p_tta = np.full(len(other), np.nan), np.full(len(other), np.nan)
    o_pat = other["patient"].astype(str).to_numpy() if len(other) else np.zeros(0, str)

    def score_other(model, idx: np.ndarray, temp: float, temp_tta: float | None, by: str) -> None:
        """Other magnifications' frames of patients this model never saw: plain and, with --tta-eval, 8 views."""
        zo = predict_logits(model, o_images, cfg, idx)
        o_logit[idx], o_p[idx], o_by[idx] = zo, apply_temperature(zo, temp), by
        if eval_tta:
            zot = predict_logits(model, o_images, cfg, idx, tta=True)
            o_logit_tta[idx], o_p_tta[idx] = zot, apply_temperature(zot, temp_tta)
    oof_tta = np.full(len(df), np.nan)
    oof_p_tta = np.full(len(df), np.nan)
    oof_logit = np.full(len(df), np.nan)
    oof_p = np.full(len(df), np.nan)
    base_p = np.full(len(df), np.nan)
    fold = np.full(len(df), -1)
    per_fold = []
    if cv and cv > 1:
        fold = grouped_kfold(df, cv, seed).to_numpy()
        protocol = (f"{fold.max() + 1}-fold stratified patient-grouped cross-validation; out-of-fold predictions of "
                    "patients never seen by their fold's model are the test set; temperature fitted per fold on "
                    "inner validation patients")
        for k in range(fold.max() + 1):
            te = np.flatnonzero(fold == k)
            trv = np.flatnonzero(fold != k)
            model, res, temp, tr, va, temp_tta = one_fit(trv, seed + k, f"fold{k}")
            assert not set(patients[te]) & set(patients[trv])
            z = predict_logits(model, images, cfg, te)
            oof_logit[te], oof_p[te] = z, apply_temperature(z, temp)
            if eval_tta:
                zt = tta_logits_of(model, res, te)
                oof_tta[te], oof_p_tta[te] = zt, apply_temperature(zt, temp_tta)
            o_te = np.flatnonzero(np.isin(o_pat, list(set(patients[te]))))
            if len(o_te):
                score_other(model, o_te, temp, temp_tta, f"fold {k} model (patient held out)")
            if b_feats is not None:
                base_p[te] = baseline_probs(b_feats, y, w, trv, te)
            fm = summarize(y[te], oof_p[te], patients[te], n_boot=0)["metrics"]
            per_fold.append({"fold": k, "test_patients": sorted(set(patients[te])), "val_patients": sorted(set(patients[va])),
                             "temperature": temp, "temperature_fit": res.temperature_note,
                             "temperature_tta": temp_tta, "val_auc": res.val_auc,
                             "phase_chosen": res.phase_chosen, "phases": res.phases,
                             "best_epoch": res.best_epoch, "best_head_epoch": res.best_head_epoch, "log": res.log,
                             **{m: fm[m]["value"] for m in ("auc", "accuracy", "balanced_accuracy", "patient_accuracy")}})
        # Refit on every patient with the schedule the folds chose (no validation split is wasted on a few
        # patients), and calibrate with a temperature fitted on the pooled out-of-fold logits.
        head_ep = int(np.median([f["best_head_epoch"] for f in per_fold])) or fc.head_epochs
        ft = [f["best_epoch"] if f["phase_chosen"] != "head" else 0 for f in per_fold]
        ft_ep = int(np.median(ft)) if fc.recipe in ("finetune", "full") else 0
        final_fc = replace(fc, head_epochs=head_ep, finetune_epochs=ft_ep)
        final_model = fresh_model(seed)
        if hybrid:
            final_hc = final_schedule(hc, per_fold)
            final_res = fit_hybrid(final_model, arch_config, images, fmaps_of(final_model), y, patients, np.arange(len(df)),
                                   np.array([], int), cfg, final_hc, compute, "final")
        else:
            final_res = fit(final_model, arch, images, feats_of(final_model), y, patients, np.arange(len(df)), np.array([], int), cfg,
                            final_fc, compute, "final")
        final_model.load_state_dict(final_res.state)
        final_temp = fit_temperature_guarded(oof_logit, y)[0]
        temp_tta_final = fit_temperature_guarded(oof_tta, y)[0] if eval_tta else None
        schedule = ({"phase_epochs": [final_hc.p1_epochs, final_hc.p2_epochs, final_hc.p3_epochs],
                     "source": "phase 1: median of the folds' best epochs; a later phase only where most folds' best "
                               "state came from it"} if hybrid else
                    {"head_epochs": head_ep, "finetune_epochs": ft_ep, "source": "median of the folds' best epochs"})
        final_schedule_ = {**schedule, "temperature_source": "fitted on the pooled out-of-fold logits of the fold models"}
        part = np.full(len(df), "train")
    else:
        part = patient_split(df, val=0.15, test=0.15, seed=seed).to_numpy()
        protocol = "single patient-wise train/val/test split (15% of patients per label in val and in test)"
        tr, va, te = (np.flatnonzero(part == s) for s in ("train", "val", "test"))
        final_model = fresh_model(seed)
        if hybrid:
            final_res = fit_hybrid(final_model, arch_config, images, fmaps_of(final_model), y, patients, tr, va, cfg, hc, compute, "split")
        else:
            final_res = fit(final_model, arch, images, feats_of(final_model), y, patients, tr, va, cfg, fc, compute, "split")
        final_model.load_state_dict(final_res.state)
        final_temp = fit_temperature(final_res.val_logits, y[va])
        temp_tta_final = fit_temperature(predict_logits(final_model, images, cfg, va, tta=True), y[va]) if eval_tta else None
        final_schedule_ = {"source": "early stopping on validation patients", "temperature_source": "validation patients"}
        z = predict_logits(final_model, images, cfg, te)
        oof_logit[te], oof_p[te] = z, apply_temperature(z, final_temp)
        if eval_tta:
            zt = predict_logits(final_model, images, cfg, te, tta=True)
            oof_tta[te] = zt
            oof_p_tta[te] = apply_temperature(zt, temp_tta_final)
        o_te = np.flatnonzero(np.isin(o_pat, list(set(patients[te]))))
        if len(o_te):
            score_other(final_model, o_te, final_temp, temp_tta_final, "model (test patient)")
        if b_feats is not None:
            base_p[te] = baseline_probs(b_feats, y, w, np.concatenate([tr, va]), te)
    assert_patient_disjoint(pd.Series(patients), pd.Series(part))

    out.mkdir(parents=True, exist_ok=True)
    split_df = df.assign(part=part, cv_fold=fold)
    write_split_csv(split_df, out / "split.csv", ["part", "cv_fold"])
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in final_model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))

    never_seen = np.flatnonzero(~np.isin(o_pat, list(set(patients))))
    if len(never_seen):
        score_other(final_model, never_seen, final_temp, temp_tta_final,
                    "final model (patient has no frame at this magnification: never seen)")
    pred = pd.DataFrame({"path": df["path"], "patient": patients, "label": y, "magnification": df["magnification"],
                         "source": df["source"], "cv_fold": fold, "part": part, "logit": oof_logit, "p_malignant": oof_p,
                         "p_baseline": base_p})
    if eval_tta:
        pred["logit_tta"], pred["p_tta"] = oof_tta, oof_p_tta
    pred = pd.concat([pred, quality_table(df["path"].tolist())], axis=1)
    pred.to_csv(out / "predictions.csv", index=False)
    cross = None
    if len(other):
        xm = pd.DataFrame({"path": other["path"], "patient": o_pat, "label": (other["label"] == "malignant").astype(int),
                           "magnification": other["magnification"], "logit": o_logit, "p_malignant": o_p, "predicted_by": o_by})
        if eval_tta:
            xm["logit_tta"], xm["p_tta"] = o_logit_tta, o_p_tta
        xm = xm[xm["logit"].notna()]
        xm.to_csv(out / "predictions_cross_magnification.csv", index=False)
        cross = cross_magnification_scores(xm, n_boot, seed)
    evaluation = {"protocol": protocol, "per_fold": per_fold}
    if cross is not None:
        evaluation["cross_magnification"] = cross
    baseline = ({"description": "frozen ImageNet EfficientNet-Lite2 features + logistic regression (C=1), same folds"}
                if b_feats is not None else {})

    mid = model_id or f"{magnification}/{out.name}"
    card = ModelCard(
        model_id=mid, architecture=arch, magnification=magnification, preprocess=cfg, init=init_record,
        arch_config=arch_config,
        temperature=final_temp, weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": "phased (hybrid)" if hybrid else fc.recipe, "final_model_schedule": final_schedule_,
                "compute": compute.reason, **({"phases_per_fold": [f["phases"] for f in per_fold]} if hybrid else {}),
                "phases_chosen_by_fold_validation": [f["phase_chosen"] for f in per_fold] or [final_res.phase_chosen]},
        hyperparameters=(asdict(hc) if hybrid else asdict(fc)) | {"cv_folds": cv, "seed": seed, "stain": stain,
                                                                  "eval_tta": eval_tta},
        data={"source": str(data), "magnification": magnification, "all": counts(df),
              "final_model": {"train": counts(df[part == "train"]), "val": counts(df[part == "val"]),
                              **({"test": counts(df[part == "test"])} if (part == "test").any() else {})},
              "skipped": [{"path": p, "reason": r} for p, r in skipped]},
        evaluation=evaluation, per_magnification={}, baseline=baseline, training_log=final_res.log,
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
