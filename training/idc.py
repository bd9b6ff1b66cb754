"""IDC patch classification (issue 17, second part): data layer and patient-wise repeated CV.

Reads three layouts: a folder with `manifest.csv` (path, label, patient, as in ../shared/data/idc), flat patch
names `<patient>_idx5_x<X>_y<Y>_class<0|1>.png`, and the public collection's own tree `<patient>/<0|1>/<name>.png`
(the folder's class must agree with the name's). Recipe: the frozen ImageNet Lite2 backbone on patches upsampled
to a given input size, logistic regression with patient- and class-balanced weights; 3 split seeds x 5
patient-grouped folds; patch AUC with patient-bootstrap CIs, the two input sizes compared on identical folds by a
paired patient-bootstrap, and each patient's IDC burden (share of positive patches) as predicted vs as labelled.

    python -m training idc-cv --data ../shared/data/idc --sizes 112 224 --out benchmarks/results/idc_cv.json
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from models.archs import arch_spec, build_model
from models.card import PreprocessConfig, metric
from models.idc import PATCH, pad_patch, parse_patch_name
from models.preprocess import frame_to_tensor, load_image
from models.metrics import _safe_auc, paired_auc_difference, summarize
from training.engine import sample_weights
from training.splits import stratified_group_folds

log = logging.getLogger("training")


def index_idc(folder: str | Path) -> pd.DataFrame:
    """One row per patch: path, y (1 = IDC-positive), patient, x, y_coord. Disagreements are refused, not guessed."""
    folder = Path(folder)
    rows = []
    if (folder / "manifest.csv").is_file():
        man = pd.read_csv(folder / "manifest.csv", dtype={"patient": str})
        bad = sorted(set(man["label"]) - {"idc_positive", "idc_negative"})
        if bad:
            raise ValueError(f"{folder / 'manifest.csv'}: unknown IDC label(s) {bad}")
        for r in man.to_dict("records"):
            p = (folder / r["path"]).resolve()
            if folder.resolve() not in p.parents:
                raise ValueError(f"{folder / 'manifest.csv'}: path {r['path']!r} leaves the data folder")
            name = parse_patch_name(p.name)
            rows.append({"path": str(p), "y": int(r["label"] == "idc_positive"), "patient": str(r["patient"]),
                         "x": name.x if name else -1, "y_coord": name.y if name else -1})
    else:
        for p in sorted(folder.rglob("*.png")):
            name = parse_patch_name(p.name)
            if name is None:
                continue
            if p.parent.name in ("0", "1") and int(p.parent.name) != name.label:
                raise ValueError(f"{p}: the folder says class {p.parent.name}, the name class {name.label}")
            rows.append({"path": str(p.resolve()), "y": name.label, "patient": name.patient, "x": name.x,
                         "y_coord": name.y})
    if not rows:
        raise ValueError(f"{folder}: no IDC patches found (manifest.csv, or names <patient>_idx5_x<X>_y<Y>_class<0|1>.png)")
    return pd.DataFrame(rows)


# What every IDC patch model card says it is for (train-idc and idc-finetune-cv write the same words).
IDC_TASK = ("binary classification of 50x50 H&E patches of breast whole-slide scans: IDC-negative (0) vs "
            "IDC-positive (1) (invasive ductal carcinoma)")
IDC_OUTPUT = "one logit; p_idc = sigmoid(logit / temperature)"
IDC_INTENDED_USE = ("Research aid: locating invasive ductal carcinoma among 50x50 patches of one collection's "
                    "40X whole-slide scans. Not a diagnosis; not validated for clinical use.")


def patch_config(size: int, arch: str = "efficientnet_lite2") -> PreprocessConfig:
    """How a patch becomes the network's input, the same in training and in the shipped card (inference follows it)."""
    spec = arch_spec(arch)
    return PreprocessConfig((size, size), spec.mean, spec.std, interpolation="bicubic",
                            crop=f"none: the {PATCH}x{PATCH} patch is upsampled to {size}x{size}")


@torch.inference_mode()
def patch_features(paths: list[str], weights: str, size: int, cache_dir: Path, batch: int = 64,
                   arch: str = "efficientnet_lite2") -> np.ndarray:
    """(N, D) frozen embeddings (ImageNet Lite2 by default; any registered arch with its weights, e.g. the published
    system's efficientnet_v2_s with --weights imagenet where torchvision can fetch them) of patches upsampled to
    size x size (models.preprocess, as at inference); cached by content (weights + preprocessing + patch bytes)."""
    model, rec = build_model(arch, weights)
    model.eval()
    cfg = patch_config(size, arch)
    h = hashlib.sha256(f"idc|{arch}|{rec.get('file_sha256', weights)}|{cfg}|pad-white".encode())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    cache = Path(cache_dir) / "features" / f"idc_{h.hexdigest()[:24]}.npy"
    if cache.is_file():
        return np.load(cache)
    out = []
    for i in range(0, len(paths), batch):
        # min_side=1: the collection holds edge patches down to 50x1; they are padded, as the IDC predictor (models.engine.idc) pads them
        x = torch.stack([frame_to_tensor(pad_patch(load_image(p, min_side=1).image), cfg)
                         for p in paths[i:i + batch]])
        out.append(model.features(x).numpy())
    feats = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, feats)
    return feats


def idc_folds(df: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    return stratified_group_folds(df["y"].to_numpy(), df["patient"].astype(str).to_numpy(), k, seed)


def out_of_fold_logits(feats: np.ndarray, df: pd.DataFrame, split_seeds=(0, 1, 2), k: int = 5) -> tuple[np.ndarray, list]:
    """Out-of-fold logits averaged over split seeds, and the per-fold AUCs; folds are patient-disjoint (checked)."""
    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)
    z = np.zeros((len(split_seeds), len(df)))
    fold_aucs = []
    for si, seed in enumerate(split_seeds):
        fold = idc_folds(df, k, seed)
        for j in range(k):
            te, tr = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
            assert not set(pats[te]) & set(pats[tr]), "IDC folds share a patient"
            sc = StandardScaler().fit(feats[tr])
            lr = LogisticRegression(C=0.05, max_iter=3000).fit(sc.transform(feats[tr]), y[tr], sample_weight=w[tr])
            z[si, te] = lr.decision_function(sc.transform(feats[te]))
            fold_aucs.append(_safe_auc(y[te], z[si, te]))
    return z.mean(0), fold_aucs


def burden_table(df: pd.DataFrame, p: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    """Per patient: patches, labelled IDC burden (share of positive patches) and the predicted one."""
    t = pd.DataFrame({"patient": df["patient"].astype(str), "labelled": df["y"], "predicted": p >= threshold})
    g = t.groupby("patient")
    return pd.DataFrame({"patches": g.size(), "labelled_burden": g["labelled"].mean(),
                         "predicted_burden": g["predicted"].mean()})


def idc_cv(df: pd.DataFrame, feats_by_size: dict[int, np.ndarray], split_seeds=(0, 1, 2), k: int = 5,
           n_boot: int = 1000) -> dict:
    """Each input size under the same patient-grouped folds; sizes compared by a paired patient bootstrap."""
    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    out = {"protocol": f"{len(split_seeds)} split seeds x {k} stratified patient-grouped folds, identical for every "
                       "input size; frozen ImageNet Lite2 features of the 50x50 patch upsampled (bicubic) to the input "
                       "size; logistic regression (C=0.05, patient- and class-balanced weights); out-of-fold logits "
                       "averaged over split seeds; 95% CIs from resampling patients",
           "n_patches": {"negative": int((y == 0).sum()), "positive": int((y == 1).sum())},
           "n_patients": int(len(set(pats))),
           "patients_with_positive_patches": int(df.loc[df["y"] == 1, "patient"].nunique()), "sizes": {}}
    logits = {}
    for size, feats in feats_by_size.items():
        z, fa = out_of_fold_logits(feats, df, split_seeds, k)
        logits[size] = z
        p = 1 / (1 + np.exp(-z))
        s = summarize(y, p, pats, n_boot=n_boot, score=z)
        bt = burden_table(df, p)
        err = (bt["predicted_burden"] - bt["labelled_burden"]).abs()
        fa = np.array(fa, float)
        out["sizes"][str(size)] = {
            "summary": {m: asdict(metric(s, m)) for m in ("auc", "accuracy", "balanced_accuracy")},
            "per_fold_auc_mean": float(np.nanmean(fa)), "per_fold_auc_sd": float(np.nanstd(fa, ddof=1)),
            "burden_mean_abs_error": float(err.mean()),
            "burden_correlation": float(np.corrcoef(bt["predicted_burden"], bt["labelled_burden"])[0, 1]),
        }
    sizes = list(feats_by_size)
    if len(sizes) == 2:
        out["paired_difference"] = {f"{sizes[1]} minus {sizes[0]}": paired_auc_difference(
            y, logits[sizes[1]], logits[sizes[0]], pats, n_boot=n_boot)}
    return out


def markdown_table(res: dict) -> str:
    def f(m):
        return f"{m['value']:.3f} ({m['ci95'][0]:.3f}–{m['ci95'][1]:.3f})"

    n = res["n_patches"]
    lines = [f"{n['negative'] + n['positive']} patches ({n['positive']} IDC-positive) from {res['n_patients']} patients "
             f"({res['patients_with_positive_patches']} with positive patches). Protocol: {res['protocol']}.", "",
             "| input size | patch AUC (95% CI) | balanced accuracy (95% CI) | per-fold AUC mean ± SD | IDC burden: mean "
             "absolute error per patient | burden correlation |", "|---|---|---|---|---|---|"]
    for size, r in res["sizes"].items():
        s = r["summary"]
        lines.append(f"| {size}x{size} | {f(s['auc'])} | {f(s['balanced_accuracy'])} | {r['per_fold_auc_mean']:.3f} ± "
                     f"{r['per_fold_auc_sd']:.3f} | {r['burden_mean_abs_error']:.3f} | {r['burden_correlation']:.2f} |")
    for name, d in (res.get("paired_difference") or {}).items():
        lines += ["", f"Paired difference ({name}): {d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})."]
    return "\n".join(lines)


def train_idc_model(data: str | Path, out: Path, weights: str, size: int = 224, split_seeds=(0, 1, 2), k: int = 5,
                    n_boot: int = 1000, cache_dir: Path | None = None, arch: str = "efficientnet_lite2"):
    """Ship an IDC patch model: the frozen ImageNet Lite2 backbone with a logistic-regression head folded into its
    `fc`, temperature from the out-of-fold logits (guarded), and the patient-wise repeated CV as its evaluation."""
    import datetime as _dt
    import time

    from safetensors.torch import save_file

    from models.archs import file_sha256
    from models.card import ModelCard
    from models.metrics import apply_temperature, fit_temperature_guarded
    from training.data import default_cache_dir
    from training.engine import fit_logistic_head
    from training.train import git_commit, versions

    t0 = time.time()
    df = index_idc(data)
    feats = patch_features(df["path"].tolist(), weights, size, Path(cache_dir or default_cache_dir()), arch=arch)
    y, pats = df["y"].to_numpy(), df["patient"].astype(str).to_numpy()
    cv = idc_cv(df, {size: feats}, split_seeds, k, n_boot)
    z, _ = out_of_fold_logits(feats, df, split_seeds, k)
    temp, temp_note = fit_temperature_guarded(z, y)
    weight, bias = fit_logistic_head(feats, y, sample_weights(y, pats), np.arange(len(df)), C=0.05)
    model, rec = build_model(arch, weights)
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(weight).float().unsqueeze(0))
        model.fc.bias.fill_(float(bias))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({kk: (v.half() if v.is_floating_point() else v).contiguous() for kk, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    p = apply_temperature(z, temp)
    overall = summarize(y, p, pats, n_boot=n_boot, score=z)
    pd.DataFrame({"path": df["path"], "patient": pats, "label": y, "x": df["x"], "y_coord": df["y_coord"],
                  "logit": z, "p_idc": p}).to_csv(out / "predictions.csv", index=False)
    n_pos = int(df.loc[df["y"] == 1, "patient"].nunique())
    card = ModelCard(
        model_id=f"{out.parent.name}/{out.name}", architecture=arch, magnification="40X",
        preprocess=patch_config(size, arch), task_kind="idc",
        task=IDC_TASK, output=IDC_OUTPUT,
        init={**rec, "description": rec["description"] + " (frozen: only the logistic-regression head is trained)"},
        temperature=temp, weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": "idc_frozen_lr", "description": f"frozen {arch} embedding ({rec['description']}) of the patch upsampled to "
                f"{size}x{size}; logistic regression (C=0.05, patient- and class-balanced weights), folded into fc",
                "temperature_fit": temp_note},
        hyperparameters={"C": 0.05, "input_size": size},
        data={"source": str(data), "patches": {"negative": int((y == 0).sum()), "positive": int((y == 1).sum())},
              "patients": int(len(set(pats))), "patients_with_positive_patches": n_pos,
              "note": "in the evaluation summaries 'benign' means IDC-negative and 'malignant' IDC-positive; a "
                      "patient is counted under the label of most of its patches"},
        split_file="predictions.csv",
        evaluation={"protocol": cv["protocol"], "overall": overall, "idc_cv": cv},
        training_time_s=time.time() - t0, versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        intended_use=IDC_INTENDED_USE,
        limitations=[f"{len(set(pats))} patients, {len(df)} patches: a sample of the public IDC collection, one "
                     "source; other scanners and stains are not measured.",
                     "The backbone is frozen ImageNet Lite2: only a linear head was trained.",
                     "The evaluation's CIs come from resampling patients; patient-level IDC burden is compared as "
                     "predicted vs labelled share of positive patches."],
        changelog=[f"{_dt.date.today().isoformat()}: trained by `python -m training train-idc`"])
    card.to_json(out / "card.json")
    return card
