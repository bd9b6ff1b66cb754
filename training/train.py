"""The `train` command: patient-grouped CV (or a train/val/test split), final model, card and curves."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.archs import ARCHITECTURES, build_model, file_sha256
from models.card import ModelCard, PreprocessConfig
from models.metrics import apply_temperature, curve_points, fit_temperature, summarize
from training.data import IndexResult, default_cache_dir, index_source
from training.engine import FitConfig, cache_images, cached_features, fit, sample_weights, select_compute
from training.splits import assert_patient_disjoint, grouped_kfold, patient_split, write_split_csv

log = logging.getLogger("training")
BASELINE_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "shared" / "weights" / "efficientnet_lite2_in1k.safetensors"


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
    if magnification != "all":
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
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(feats[tr], y[tr], logisticregression__sample_weight=w[tr])
    return clf.predict_proba(feats[te])[:, 1]


def _per_group(df: pd.DataFrame, p: np.ndarray, mask: np.ndarray, n_boot: int, col: str = "magnification") -> dict:
    out = {}
    for g in sorted(df.loc[mask, col].unique()):
        m = mask & (df[col] == g).to_numpy()
        y = (df.loc[m, "label"] == "malignant").astype(int).to_numpy()
        out[g] = summarize(y, p[m], df.loc[m, "patient"].to_numpy(), n_boot=n_boot)
    return out


def run_train(data: str, magnification: str, arch: str, init: str, out: Path, fc: FitConfig, cv: int = 5,
              seed: int = 0, n_boot: int = 1000, cache_dir: Path | None = None, model_id: str | None = None,
              baseline_init: str | None = None, force_fp32: bool = False, limitations: list[str] | None = None) -> ModelCard:
    t_start = time.time()
    cache_dir = Path(cache_dir or default_cache_dir())
    compute = select_compute(force_fp32)
    log.info("compute: %s", compute.reason)
    index = index_source(data, cache_dir)
    log.info(index.summary())
    df = select_rows(index, magnification)
    spec = ARCHITECTURES[arch]
    cfg = PreprocessConfig(input_size=spec.input_size, mean=spec.mean, std=spec.std)
    images, keep, bad = cache_images(df, cfg)
    skipped = index.skipped + bad
    df = df.iloc[keep].reset_index(drop=True)
    y = (df["label"] == "malignant").astype(int).to_numpy()
    patients = df["patient"].astype(str).to_numpy()

    model0, init_record = build_model(arch, init)
    needs_feats = fc.recipe in ("linear", "finetune")
    feats = cached_features(model0, images, cfg, [arch, init_record.get("file_sha256", init), str(cfg), *df["path"]],
                            cache_dir) if needs_feats else None
    # Baseline: frozen ImageNet Lite2 features + logistic regression, on the very same folds.
    b_init = baseline_init or (str(BASELINE_WEIGHTS) if BASELINE_WEIGHTS.is_file() else None)
    b_feats = None
    if b_init:
        bspec = ARCHITECTURES["efficientnet_lite2"]
        bcfg = PreprocessConfig(input_size=bspec.input_size, mean=bspec.mean, std=bspec.std)
        if arch == "efficientnet_lite2" and init == b_init and feats is not None:
            b_feats = feats
        else:
            bmodel, brec = build_model("efficientnet_lite2", b_init)
            bimages = images if bcfg == cfg else cache_images(df, bcfg)[0]
            b_feats = cached_features(bmodel, bimages, bcfg, ["efficientnet_lite2", brec["file_sha256"], str(bcfg), *df["path"]], cache_dir)
    w = sample_weights(y, patients)

    def one_fit(train_df_idx: np.ndarray, seed_: int, desc: str):
        sub = df.iloc[train_df_idx]
        part = inner_split(sub, seed_).to_numpy()
        tr, va = train_df_idx[part == "train"], train_df_idx[part == "val"]
        model, _ = build_model(arch, init)
        res = fit(model, arch, images, feats, y, patients, tr, va, cfg, fc, compute, desc)
        model.load_state_dict(res.state)
        temp = fit_temperature(res.val_logits, y[va])
        return model, res, temp, tr, va

    oof_logit = np.full(len(df), np.nan)
    oof_p = np.full(len(df), np.nan)
    base_p = np.full(len(df), np.nan)
    fold = np.full(len(df), -1)
    per_fold = []
    from models.inference import LoadedModel  # noqa: F401  (the same forward as inference)

    if cv and cv > 1:
        fold = grouped_kfold(df, cv, seed).to_numpy()
        protocol = (f"{fold.max() + 1}-fold stratified patient-grouped cross-validation; out-of-fold predictions of "
                    "patients never seen by their fold's model are the test set; temperature fitted per fold on "
                    "inner validation patients")
        for k in range(fold.max() + 1):
            te = np.flatnonzero(fold == k)
            trv = np.flatnonzero(fold != k)
            model, res, temp, tr, va = one_fit(trv, seed + k, f"fold{k}")
            assert not set(patients[te]) & set(patients[trv])
            z = _logits(model, images[te], cfg)
            oof_logit[te], oof_p[te] = z, apply_temperature(z, temp)
            if b_feats is not None:
                base_p[te] = baseline_probs(b_feats, y, w, trv, te)
            fm = summarize(y[te], oof_p[te], patients[te], n_boot=0)["metrics"]
            per_fold.append({"fold": k, "test_patients": sorted(set(patients[te])), "val_patients": sorted(set(patients[va])),
                             "temperature": temp, "val_auc": res.val_auc, "phase_chosen": res.phase_chosen,
                             **{m: fm[m]["value"] for m in ("auc", "accuracy", "balanced_accuracy", "patient_accuracy")}})
        final_model, final_res, final_temp, tr, va = one_fit(np.arange(len(df)), seed, "final")
        part = np.where(np.isin(np.arange(len(df)), va), "val", "train")
        test_mask = np.ones(len(df), bool)
    else:
        part = patient_split(df, val=0.15, test=0.15, seed=seed).to_numpy()
        protocol = "single patient-wise train/val/test split (15% of patients per label in val and in test)"
        tr, va, te = (np.flatnonzero(part == s) for s in ("train", "val", "test"))
        final_model, _ = build_model(arch, init)
        final_res = fit(final_model, arch, images, feats, y, patients, tr, va, cfg, fc, compute, "split")
        final_model.load_state_dict(final_res.state)
        final_temp = fit_temperature(final_res.val_logits, y[va])
        z = _logits(final_model, images[te], cfg)
        oof_logit[te], oof_p[te] = z, apply_temperature(z, final_temp)
        if b_feats is not None:
            base_p[te] = baseline_probs(b_feats, y, w, np.concatenate([tr, va]), te)
        test_mask = part == "test"
    assert_patient_disjoint(pd.Series(patients), pd.Series(part))

    out.mkdir(parents=True, exist_ok=True)
    split_df = df.assign(part=part, cv_fold=fold)
    write_split_csv(split_df, out / "split.csv", ["part", "cv_fold"])
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in final_model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))

    m = test_mask
    evaluation = {"protocol": protocol, "overall": summarize(y[m], oof_p[m], patients[m], n_boot=n_boot, seed=seed),
                  "per_fold": per_fold}
    per_mag = _per_group(df, oof_p, m, n_boot) if magnification == "all" else {}
    per_source = {}
    if df["source"].nunique() > 1:
        src = df["source"].str.split("@").str[0]
        per_source = {s: float((((oof_p[m & (src == s).to_numpy()]) >= 0.5).astype(int) == y[m & (src == s).to_numpy()]).mean())
                      for s in sorted(src[m].unique())}
    evaluation["accuracy_by_source_repository"] = per_source
    baseline = {}
    if b_feats is not None:
        baseline = {"description": "frozen ImageNet EfficientNet-Lite2 features + logistic regression (C=1), same folds",
                    "overall": summarize(y[m], base_p[m], patients[m], n_boot=n_boot, seed=seed),
                    "per_magnification": _per_group(df, base_p, m, n_boot) if magnification == "all" else {}}
    pd.DataFrame({"path": df["path"], "patient": patients, "label": y, "magnification": df["magnification"],
                  "cv_fold": fold, "part": part, "logit": oof_logit, "p_malignant": oof_p, "p_baseline": base_p}
                 ).to_csv(out / "predictions.csv", index=False)
    curves = {"overall": curve_points(y[m], oof_p[m]),
              "baseline": curve_points(y[m], base_p[m]) if b_feats is not None else {},
              "per_magnification": {g: curve_points(y[m & (df["magnification"] == g).to_numpy()],
                                                    oof_p[m & (df["magnification"] == g).to_numpy()])
                                    for g in sorted(df["magnification"].unique())}}
    (out / "curves.json").write_text(json.dumps(curves))

    mid = model_id or f"{magnification}/{out.name}"
    card = ModelCard(
        model_id=mid, architecture=arch, magnification=magnification, preprocess=cfg, init=init_record,
        temperature=final_temp, weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": fc.recipe, "phase_chosen_by_validation": final_res.phase_chosen, "compute": compute.reason},
        hyperparameters=asdict(fc) | {"cv_folds": cv, "seed": seed},
        data={"source": str(data), "magnification": magnification, "all": counts(df),
              "final_model": {"train": counts(df[part == "train"]), "val": counts(df[part == "val"]),
                              **({"test": counts(df[part == "test"])} if (part == "test").any() else {})},
              "skipped": [{"path": p, "reason": r} for p, r in skipped]},
        evaluation=evaluation, per_magnification=per_mag, baseline=baseline, training_log=final_res.log,
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
    card.to_json(out / "card.json")
    return card


def _logits(model, images: torch.Tensor, cfg: PreprocessConfig) -> np.ndarray:
    """Test logits through exactly the inference forward (fp32, eval mode)."""
    from models.preprocess import normalize_uint8

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            out.append(model(normalize_uint8(images[i:i + 16], cfg)).double().numpy())
    return np.concatenate(out)
