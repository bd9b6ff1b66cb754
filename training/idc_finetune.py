"""A fine-tuned IDC patch model against the frozen one (issue 25 item 6), on identical patient folds.

Recipe: ImageNet Lite2 fine-tuned end to end (the BreakHis reference recipe's engine.fit 'full': HED + HSV colour
augmentation, patient-balanced sampling, early stopping on inner validation patients) on the 50x50 patches upsampled
to `size`. Evaluation: the same stratified patient-grouped folds (split seed 0, 5 folds) as the frozen Lite2 +
logistic regression at the same input size, whose out-of-fold logits are recomputed on those folds; the two compared
by the paired patient bootstrap. The routing rule is the frames' rule: the fine-tuned model is shipped (and routed)
only when the lower end of the 95% CI of its AUC advantage is above zero.

    python -m training idc-finetune-cv --data ../shared/data/idc --size 112 --out benchmarks/results/idc_finetune.json
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.archs import build_model
from models.idc import pad_patch
from models.metrics import _safe_auc, paired_auc_difference, summarize
from models.preprocess import frame_to_uint8, load_image
from training.engine import FitConfig, fit, predict_logits, select_compute
from training.idc import (IDC_INTENDED_USE, IDC_OUTPUT, IDC_TASK, idc_folds, index_idc, out_of_fold_logits,
                          patch_config, patch_features)
from training.splits import patient_split

log = logging.getLogger("training")


def decode_patches(paths: list[str], size: int) -> torch.Tensor:
    """uint8 (N,3,size,size): each patch padded as at inference (models.idc.pad_patch), then resized by the card's rule."""
    cfg = patch_config(size)
    return torch.stack([frame_to_uint8(pad_patch(load_image(p, min_side=1).image), cfg)
                        for p in tqdm(paths, desc="decode patches", leave=False)])


def idc_finetune_cv(data: str | Path, weights: str, size: int = 112, k: int = 5, seed: int = 0, epochs: int = 4,
                    lr: float = 2e-4, batch_size: int = 32, n_boot: int = 1000, cache_dir: Path | None = None,
                    save_backbone: Path | None = None, ship_to: Path | None = None,
                    incumbent: str = "idc/efficientnet_lite2_idc") -> dict:
    """Fine-tuned vs frozen Lite2 on the same patient folds; optionally saves a refit-on-all-patients backbone (the
    in-domain initialisation the BreakHis recipe can start from with --init FILE), and, where the fine-tuned model
    beats the frozen one by the paired rule, ships the refit as a model folder (`ship_to`) whose card records the
    comparison that routes it (models.routing.rule.task_entry)."""
    from training.data import default_cache_dir

    t0 = time.time()
    df = index_idc(data)
    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    cfg = patch_config(size)
    images = decode_patches(df["path"].tolist(), size)
    compute = select_compute()
    fc = FitConfig(recipe="full", finetune_epochs=epochs, lr_full=lr, colour_augmentation="hed", balanced_sampling=True,
                   batch_size=batch_size, patience=epochs, seed=seed)
    fold = idc_folds(df, k, seed)
    z = np.full(len(df), np.nan)
    per_fold, best_epochs = [], []
    for f in range(k):
        te, trv = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        assert not set(pats[te]) & set(pats[trv]), "IDC folds share a patient"
        part = patient_split(df.iloc[trv].assign(label=np.where(y[trv] == 1, "malignant", "benign")), val=0.2, test=0.0,
                             seed=seed + f).to_numpy()
        tr, va = trv[part == "train"], trv[part == "val"]
        torch.manual_seed(seed + f)
        model, _ = build_model("efficientnet_lite2", weights)
        res = fit(model, "efficientnet_lite2", images, None, y, pats, tr, va, cfg, fc, compute, f"idc fold{f}")
        model.load_state_dict(res.state)
        z[te] = predict_logits(model, images, cfg, te)
        best_epochs.append(res.best_epoch)
        per_fold.append({"fold": f, "val_auc": res.val_auc, "best_epoch": res.best_epoch,
                         "test_auc": _safe_auc(y[te], z[te]), "log": res.log})
        log.info("idc fold %d: test AUC %.3f", f, per_fold[-1]["test_auc"])
    feats = patch_features(df["path"].tolist(), weights, size, Path(cache_dir or default_cache_dir()))
    z_frozen, _ = out_of_fold_logits(feats, df, (seed,), k)
    s_ft = summarize(y, 1 / (1 + np.exp(-z)), pats, n_boot=n_boot, score=z)
    s_fr = summarize(y, 1 / (1 + np.exp(-z_frozen)), pats, n_boot=n_boot, score=z_frozen)
    diff = paired_auc_difference(y, z, z_frozen, pats, n_boot=2000, seed=0)
    out = {"protocol": (f"split seed {seed}, {k} stratified patient-grouped folds (idc-cv's folds for that seed); both "
                        f"recipes at {size}x{size}; fine-tuned: ImageNet Lite2, every layer, {epochs} epochs max, "
                        f"lr {lr}, HED + HSV colour augmentation, patient-balanced sampling, batch {batch_size}, early "
                        "stopping on inner validation patients (20%); frozen: Lite2 features + logistic regression "
                        "(C=0.05) on the same folds; paired patient bootstrap (2,000) on identical patches"),
           "n_patches": int(len(df)), "n_patients": int(len(set(pats))), "compute": compute.reason,
           "fine_tuned": {"auc": s_ft["metrics"]["auc"], "balanced_accuracy": s_ft["metrics"]["balanced_accuracy"],
                          "per_fold": per_fold},
           "frozen": {"auc": s_fr["metrics"]["auc"], "balanced_accuracy": s_fr["metrics"]["balanced_accuracy"]},
           "fine_tuned_minus_frozen": diff, "routes": bool(diff["ci95"][0] > 0),
           "rule": "route the fine-tuned model only if the paired 95% CI of its AUC advantage lies above zero"}
    out["out_of_fold"] = {"logit_fine_tuned": z.tolist(), "logit_frozen": z_frozen.tolist(), "fold": fold.tolist()}
    if save_backbone is not None or (ship_to is not None and out["routes"]):
        # the in-domain initialisation: every patient, the folds' median best epoch, no validation
        fc_all = FitConfig(**{**fc.__dict__, "finetune_epochs": max(1, int(np.median(best_epochs)))})
        torch.manual_seed(seed)
        model, _ = build_model("efficientnet_lite2", weights)
        res = fit(model, "efficientnet_lite2", images, None, y, pats, np.arange(len(df)), np.array([], int), cfg,
                  fc_all, compute, "idc refit")
        model.load_state_dict(res.state)
        from safetensors.torch import save_file

        if save_backbone is not None:
            Path(save_backbone).parent.mkdir(parents=True, exist_ok=True)
            save_file({kk.removeprefix("backbone."): v.contiguous() for kk, v in model.state_dict().items()
                       if kk.startswith("backbone.")}, str(save_backbone))
            out["saved_backbone"] = {"path": str(save_backbone), "epochs": fc_all.finetune_epochs}
        if ship_to is not None and out["routes"]:
            _ship(model, df, z, fold, out, Path(ship_to), size, weights, incumbent, n_boot, t0)
    out["minutes"] = (time.time() - t0) / 60
    return out


def _ship(model, df, z: np.ndarray, fold: np.ndarray, res: dict, out: Path, size: int, weights: str, incumbent: str,
          n_boot: int, t0: float) -> None:
    """Write the refit fine-tuned IDC model: fp16 weights, out-of-fold predictions, a card whose temperature is fitted
    on the out-of-fold logits (guarded) and whose evaluation carries the paired comparison that routes it."""
    import datetime as _dt

    import pandas as pd
    from safetensors.torch import save_file

    from models.archs import file_sha256
    from models.card import ModelCard
    from models.metrics import apply_temperature, fit_temperature_guarded
    from training.train import git_commit, versions

    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    temp, note = fit_temperature_guarded(z, y)
    p = apply_temperature(z, temp)
    pd.DataFrame({"path": df["path"], "patient": pats, "label": y, "x": df["x"], "y_coord": df["y_coord"],
                  "cv_fold": fold, "logit": z, "p_idc": p}).to_csv(out / "predictions.csv", index=False)
    n_pos = int(df.loc[df["y"] == 1, "patient"].nunique())
    overall = summarize(y, p, pats, n_boot=n_boot, score=z)
    _, rec = build_model("efficientnet_lite2", weights)
    card = ModelCard(
        model_id=f"{out.parent.name}/{out.name}", architecture="efficientnet_lite2", magnification="40X",
        preprocess=patch_config(size), task_kind="idc",
        task=IDC_TASK, output=IDC_OUTPUT,
        init={**rec, "description": rec["description"] + " (then every layer fine-tuned on the IDC patches)"},
        temperature=temp, weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": "idc_finetuned", "description": res["protocol"], "temperature_fit": note,
                "final_model": res.get("saved_backbone", {}).get("epochs") or "median of the folds' best epochs",
                "compute": res["compute"]},
        hyperparameters={"input_size": size, "recipe": "full", "colour_augmentation": "hed", "balanced_sampling": True},
        data={"source": "../shared/data/idc", "patches": {"negative": int((y == 0).sum()), "positive": int((y == 1).sum())},
              "patients": int(len(set(pats))), "patients_with_positive_patches": n_pos,
              "note": "in the evaluation summaries 'benign' means IDC-negative and 'malignant' IDC-positive"},
        split_file="predictions.csv",
        evaluation={"protocol": res["protocol"], "overall": overall,
                    "vs_routed": {**res["fine_tuned_minus_frozen"], "incumbent": incumbent, "same_folds": True,
                                  "rule": res["rule"], "displaces": res["routes"]}},
        training_time_s=time.time() - t0, versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        intended_use=IDC_INTENDED_USE,
        limitations=[f"{len(set(pats))} patients, {len(df)} patches: one public collection, one source; other scanners "
                     "and stains are not measured.",
                     "Evaluated on one split seed's 5 patient-grouped folds (the frozen model it displaced was "
                     "compared on exactly those folds)."],
        changelog=[f"{_dt.date.today().isoformat()}: trained by `python -m training idc-finetune-cv --ship-to`"])
    card.to_json(out / "card.json")
    res["shipped"] = str(out)


def compare_to_frozen_at(result_json: str | Path, data: str | Path, weights: str, size: int = 224,
                         cache_dir: Path | None = None) -> dict:
    """The fine-tuned model's out-of-fold logits (saved by idc_finetune_cv) against the frozen recipe at another input
    size (the shipped frozen model's 224) on the very same folds: the routed model's own recipe, paired."""
    import json

    from training.data import default_cache_dir

    res = json.loads(Path(result_json).read_text())
    df = index_idc(data)
    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    fold = np.asarray(res["out_of_fold"]["fold"])
    if len(fold) != len(df) or not np.array_equal(fold, idc_folds(df, int(fold.max()) + 1, 0)):
        raise ValueError(f"{result_json}: its folds are not split seed 0's folds of {data}")
    feats = patch_features(df["path"].tolist(), weights, size, Path(cache_dir or default_cache_dir()))
    z_frozen, _ = out_of_fold_logits(feats, df, (0,), int(fold.max()) + 1)
    z = np.asarray(res["out_of_fold"]["logit_fine_tuned"])
    d = paired_auc_difference(y, z, z_frozen, pats, n_boot=2000, seed=0)
    res[f"fine_tuned_minus_frozen_{size}"] = d
    Path(result_json).write_text(json.dumps(res, indent=1) + "\n")
    return d
