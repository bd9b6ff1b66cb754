"""Repeated patient-grouped CV of frozen-feature recipes: whole frame, native tiles, attention-MIL, both scales,
fold ensembles. Features are cached by content (weights sha256 + preprocessing + each frame's bytes), so the
repeated CV runs in minutes on 2 CPU cores.

    python -m training frozen-cv --data ../shared/data/breakhis --out benchmarks/results/frozen_cv.json
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from models.archs import arch_spec, build_model
from models.card import ALL, PreprocessConfig, metric
from models.metrics import fold_figures, paired_auc_difference, summarize
from models.preprocess import frame_to_uint8, load_image, normalize_uint8
from models.tiles import GatedAttentionMIL, tile_frame
from training.engine import fit_logistic_head, optimise_epoch, sample_weights, weighted_bce
from training.splits import assert_patient_disjoint, grouped_kfold

log = logging.getLogger("training")
RECIPES = ("whole_lr", "tiles_mean_lr", "tiles_mil", "multiscale_concat_lr", "multiscale_mean_lr",
           "whole_lr_fold_ensemble", "tiles_mean_lr_fold_ensemble")


def content_key(paths: list[str], *parts: str) -> str:
    """Cache key from what determines the features: the frames' bytes and the extractor's description."""
    h = hashlib.sha256("\n".join(parts).encode())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()[:24]


@torch.inference_mode()
def frozen_features(paths: list[str], weights: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(whole-frame features (N, D), native-tile features (N, 6, D)) of the ImageNet Lite2 backbone."""
    model, rec = build_model("efficientnet_lite2", weights)
    model.eval()
    spec = arch_spec("efficientnet_lite2")
    cfg = PreprocessConfig(spec.input_size, spec.mean, spec.std)
    key = content_key(paths, rec.get("file_sha256", weights), str(cfg), "whole+tiles2x3")
    path = Path(cache_dir) / "features" / f"frozen_{key}.npz"
    if path.is_file():
        z = np.load(path)
        return z["whole"], z["tiles"]
    whole, tiles = [], []
    for p in tqdm(paths, desc="frozen features", leave=False):
        img = load_image(p).image
        whole.append(model.features(normalize_uint8(frame_to_uint8(img, cfg), cfg)[None]).numpy()[0])
        t = tile_frame(img)
        tiles.append(model.features(normalize_uint8(t.pixels, cfg)).numpy())
    whole, tiles = np.stack(whole), np.stack(tiles)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, whole=whole, tiles=tiles)
    return whole, tiles


def fit_mil(tiles: np.ndarray, y: np.ndarray, w: np.ndarray, idx: np.ndarray, seed: int = 0, epochs: int = 60,
            lr: float = 1e-3, weight_decay: float = 1e-2) -> tuple[GatedAttentionMIL, np.ndarray, np.ndarray]:
    """Train the MIL head on standardised tile embeddings; returns (model, mean, std) for scoring."""
    torch.manual_seed(seed)
    mu, sd = tiles[idx].reshape(-1, tiles.shape[-1]).mean(0), tiles[idx].reshape(-1, tiles.shape[-1]).std(0) + 1e-6
    X = torch.from_numpy((tiles[idx] - mu) / sd).float()
    Y, W = torch.from_numpy(y[idx]).float(), torch.from_numpy(w[idx]).float()
    m = GatedAttentionMIL(tiles.shape[-1])
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        m.train()
        optimise_epoch(torch.randperm(len(idx), generator=g), 32, lambda b: weighted_bce(m(X[b]), Y[b], W[b]), opt)
    return m.eval(), mu, sd


def mil_logits(m: GatedAttentionMIL, mu: np.ndarray, sd: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return m(torch.from_numpy((tiles - mu) / sd).float()).double().numpy()


def _lr(feats: np.ndarray, y, w, tr, te) -> np.ndarray:
    weight, bias = fit_logistic_head(feats, y, w, tr)
    return feats[te] @ weight + bias


def _fold_ensemble(feats: np.ndarray, y, w, pats, df: pd.DataFrame, tr, te, seed: int, k: int = 5) -> np.ndarray:
    """Mean logit of the k inner-fold heads (what shipping the fold models together would predict)."""
    inner = grouped_kfold(df.iloc[tr], k, seed).to_numpy()
    return np.mean([_lr(feats, y, w, tr[inner != j], te) for j in np.unique(inner)], axis=0)


def recipe_logits(name: str, whole, tiles, y, w, pats, df, tr, te, seed: int) -> np.ndarray:
    """Out-of-fold logits of one recipe for test rows te, fitted on training rows tr only."""
    tmean = tiles.mean(1)
    if name == "whole_lr":
        return _lr(whole, y, w, tr, te)
    if name == "tiles_mean_lr":
        return _lr(tmean, y, w, tr, te)
    if name == "multiscale_concat_lr":
        return _lr(np.concatenate([whole, tmean], 1), y, w, tr, te)
    if name == "multiscale_mean_lr":  # ensemble of the two scales' heads
        return 0.5 * (_lr(whole, y, w, tr, te) + _lr(tmean, y, w, tr, te))
    if name == "tiles_mil":
        m, mu, sd = fit_mil(tiles, y, w, tr, seed)
        return mil_logits(m, mu, sd, tiles[te])
    if name == "whole_lr_fold_ensemble":
        return _fold_ensemble(whole, y, w, pats, df, tr, te, seed)
    if name == "tiles_mean_lr_fold_ensemble":
        return _fold_ensemble(tmean, y, w, pats, df, tr, te, seed)
    raise ValueError(f"unknown recipe {name!r}; choose from {RECIPES}")


def repeated_cv(df: pd.DataFrame, whole: np.ndarray, tiles: np.ndarray, recipes=RECIPES, split_seeds=(0, 1, 2),
                k: int = 5, n_boot: int = 1000) -> dict:
    """Rule 1: each recipe over split seeds x k patient-grouped folds, the same folds for every recipe.

    Per recipe: per-fold AUC mean and SD, pooled out-of-fold AUC per split seed, and, on the out-of-fold logits
    averaged over the split seeds, frame- and patient-level AUC/accuracy with patient-bootstrap CIs, per
    magnification AUCs, and the paired AUC difference to the whole-frame logistic regression.
    """
    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)
    oof, fold_aucs = _repeated_oof(df, recipes, lambda r, tr, te, seed: recipe_logits(
        r, whole, tiles, y, w, pats, df, tr, te, seed), split_seeds, k)
    mags = df["magnification"].to_numpy()
    out = {"protocol": f"{len(split_seeds)} split seeds x {k} stratified patient-grouped folds, identical for every "
                       "recipe; frozen ImageNet Lite2 features; summaries on the out-of-fold logits averaged over seeds",
           "split_seeds": list(split_seeds), "folds": k, "n_images": int(len(df)),
           "n_patients": {"benign": int(df.loc[y == 0, "patient"].nunique()),
                          "malignant": int(df.loc[y == 1, "patient"].nunique())}, "recipes": {}}
    for r in recipes:
        out["recipes"][r] = recipe_summary(y, pats, mags, oof[r], fold_aucs[r],
                                           oof["whole_lr"] if r != "whole_lr" and "whole_lr" in oof else None, n_boot)
        out["recipes"][r]["vs_whole_lr"] = out["recipes"][r].pop("vs_reference")
    return out


def _repeated_oof(df: pd.DataFrame, names, fit_predict, split_seeds, k: int) -> tuple[dict, dict]:
    """(split seeds, N) out-of-fold logits and per-fold AUCs of each name, over the same stratified patient-grouped
    folds for every name; fit_predict(name, train_idx, test_idx, seed) -> test logits."""
    from models.metrics import _safe_auc

    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    oof = {n: np.zeros((len(split_seeds), len(df))) for n in names}
    fold_aucs: dict[str, list] = {n: [] for n in names}
    for si, seed in enumerate(split_seeds):
        fold = grouped_kfold(df, k, seed).to_numpy()
        assert_patient_disjoint(pd.Series(pats), pd.Series(fold))
        for j in range(k):
            te, tr = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
            assert not set(pats[te]) & set(pats[tr])
            for n in names:
                oof[n][si, te] = fit_predict(n, tr, te, seed)
                fold_aucs[n].append(_safe_auc(y[te], oof[n][si, te]))
        log.info("split seed %d done", seed)
    return oof, fold_aucs


def recipe_summary(y: np.ndarray, pats: np.ndarray, mags: np.ndarray, oof: np.ndarray, fold_aucs: list,
                   reference_oof: np.ndarray | None, n_boot: int) -> dict:
    """Rule 1's figures for one recipe from its (split seeds, N) out-of-fold logits: per-fold AUC spread, pooled AUC
    per seed, and on the seed-averaged logits frame/patient figures with CIs, per magnification AUC, and the paired
    AUC difference to a reference recipe on the same folds."""
    from models.metrics import _safe_auc

    z = oof.mean(0)
    s = summarize(y, 1 / (1 + np.exp(-z)), pats, n_boot=n_boot, score=z)
    fa = np.array(fold_aucs, float)
    return {
        "per_fold_auc_mean": float(np.nanmean(fa)), "per_fold_auc_sd": float(np.nanstd(fa, ddof=1)),
        "per_fold_auc_min": float(np.nanmin(fa)), "per_fold_auc_max": float(np.nanmax(fa)),
        "pooled_auc_by_seed": [_safe_auc(y, oof[i]) for i in range(len(oof))],
        "summary": {m: asdict(metric(s, m)) for m in ("auc", "patient_auc", "patient_accuracy", "balanced_accuracy")},
        "n_patients": s["n_patients"],
        "per_magnification_auc": {g: _safe_auc(y[mags == g], z[mags == g]) for g in sorted(set(mags))},
        "vs_reference": (paired_auc_difference(y, z, reference_oof.mean(0), pats, n_boot=n_boot)
                         if reference_oof is not None else None),
    }


def feature_sets_cv(df: pd.DataFrame, sets: dict[str, np.ndarray], reference: str, split_seeds=(0, 1, 2), k: int = 5,
                    n_boot: int = 1000) -> dict:
    """Rule 1 for frozen feature sets (one frame = one vector) under logistic regression, on the very folds of
    `repeated_cv`; each set compared to `reference` by a paired patient bootstrap."""
    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)
    oof, fold_aucs = _repeated_oof(df, list(sets), lambda n, tr, te, seed: _lr(sets[n], y, w, tr, te), split_seeds, k)
    mags = df["magnification"].to_numpy()
    return {"protocol": f"{len(split_seeds)} split seeds x {k} stratified patient-grouped folds (those of frozen-cv); "
                        "logistic regression on each frozen feature set; summaries on seed-averaged logits",
            "reference": reference, "n_images": int(len(df)),
            "sets": {n: recipe_summary(y, pats, mags, oof[n], fold_aucs[n], oof[reference] if n != reference else None,
                                       n_boot) for n in sets}}


@torch.inference_mode()
def scaled_tile_means(paths: list[str], weights: str, scales: tuple[float, ...], cache_dir: Path) -> np.ndarray:
    """(S, N, D) mean native-tile embeddings of each frame rescaled by each factor first: a frame at scale s is
    the same field of view at s times the pixels per micron, as another lab's camera or objective may give."""
    model, rec = build_model("efficientnet_lite2", weights)
    model.eval()
    spec = arch_spec("efficientnet_lite2")
    cfg = PreprocessConfig(spec.input_size, spec.mean, spec.std)
    key = content_key(paths, rec.get("file_sha256", weights), str(cfg), "tile-means", *map(str, scales))
    path = Path(cache_dir) / "features" / f"scaled_{key}.npy"
    if path.is_file():
        return np.load(path)
    out = np.zeros((len(scales), len(paths), spec.feat_dim), np.float32)
    for i, p in enumerate(tqdm(paths, desc="scaled tile features", leave=False)):
        img = load_image(p).image
        for j, sc in enumerate(scales):
            im = img if sc == 1.0 else img.resize((round(img.width * sc), round(img.height * sc)), Image.BILINEAR)
            out[j, i] = model.features(normalize_uint8(tile_frame(im).pixels, cfg)).numpy().mean(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def scale_shift_cv(df: pd.DataFrame, means: np.ndarray, scales: tuple[float, ...], split_seeds=(0, 1, 2), k: int = 5,
                   n_boot: int = 1000) -> dict:
    """Does scale augmentation let a tile model survive another scale? The mean-tile logistic regression trained at
    scale 1 only, and trained on every scale (scale augmentation), each tested at every scale, on the same
    patient-grouped folds (split seeds x k); AUCs on out-of-fold logits averaged over seeds, with paired
    patient-bootstrap differences (augmented minus plain) at each test scale."""
    from models.metrics import _safe_auc

    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)
    one = scales.index(1.0)
    oof = {r: np.zeros((len(split_seeds), len(scales), len(df))) for r in ("plain", "scale_aug")}
    for si, seed in enumerate(split_seeds):
        fold = grouped_kfold(df, k, seed).to_numpy()
        assert_patient_disjoint(pd.Series(pats), pd.Series(fold))
        for j in range(k):
            te, tr = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
            heads = {"plain": fit_logistic_head(means[one], y, w, tr)}
            stacked = np.concatenate(list(means))  # every scale of every frame; rows index scale*N + frame
            tr_all = np.concatenate([tr + s_ * len(df) for s_ in range(len(scales))])
            heads["scale_aug"] = fit_logistic_head(stacked, np.tile(y, len(scales)), np.tile(w, len(scales)), tr_all)
            for r, (wt, b) in heads.items():
                for s_ in range(len(scales)):
                    oof[r][si, s_, te] = means[s_][te] @ wt + b
    res = {"protocol": f"{len(split_seeds)} split seeds x {k} patient-grouped folds; frozen ImageNet Lite2 mean "
                       "native-tile embedding + logistic regression; frames rescaled before tiling",
           "scales": list(scales), "n_images": int(len(df)),
           "n_patients": {"benign": int(df.loc[y == 0, "patient"].nunique()),
                          "malignant": int(df.loc[y == 1, "patient"].nunique())}, "by_test_scale": {}}
    for s_, sc in enumerate(scales):
        row = {}
        for r in oof:
            z = oof[r][:, s_].mean(0)
            row[r] = asdict(metric(summarize(y, 1 / (1 + np.exp(-z)), pats, n_boot=n_boot, score=z)))
            row[r]["by_seed"] = [_safe_auc(y, oof[r][i, s_]) for i in range(len(split_seeds))]
        row["scale_aug_minus_plain"] = paired_auc_difference(y, oof["scale_aug"][:, s_].mean(0),
                                                             oof["plain"][:, s_].mean(0), pats, n_boot=n_boot)
        res["by_test_scale"][str(sc)] = row
    return res


def tile_preprocess_config() -> PreprocessConfig:
    """The frozen Lite2 tile models' preprocessing (one place, so the MIL and subtype models cannot drift apart)."""
    from models.archs import ARCHITECTURES
    from models.tiles import GRID, REFERENCE_SIZE, TILE_SIZE

    spec = ARCHITECTURES["efficientnet_lite2"]
    return PreprocessConfig(TILE_SIZE, spec.mean, spec.std,
                            crop=f"none: the frame is cut into a {GRID[0]}x{GRID[1]} grid of native-resolution tiles",
                            tiles={"grid": list(GRID), "tile_size": list(TILE_SIZE), "reference_size": list(REFERENCE_SIZE)})


def train_tile_model(data: str, out: Path, weights: str, magnification: str = "all", pooling: str = "attention",
                     k: int = 5, seed: int = 0, n_boot: int = 1000, cache_dir: Path | None = None) -> "ModelCard":
    """Ship a tile model (frozen ImageNet Lite2 per native tile + attention-MIL or mean-pool head).

    Evaluation: k-fold patient-grouped CV (the same folds as `train --cv k --seed seed`); inside each fold the
    head is fitted on inner-training patients and its temperature on inner-validation patients (guarded), then
    refitted on the whole fold; out-of-fold logits are the test set. The shipped head is fitted on every patient
    with the temperature from the pooled out-of-fold logits.
    """
    import datetime as _dt
    import time

    from safetensors.torch import save_file

    from models.archs import file_sha256
    from models.card import ModelCard
    from models.metrics import apply_temperature, fit_temperature_guarded
    from training.data import default_cache_dir, index_source
    from training.engine import quality_table
    from training.splits import write_split_csv
    from training.train import (apply_scores, baseline_probs, counts, git_commit, inner_split, scores_from_predictions,
                                select_rows, versions)

    t0 = time.time()
    cache_dir = Path(cache_dir or default_cache_dir())
    index = index_source(data, cache_dir)
    df = select_rows(index, magnification)
    whole, tiles = frozen_features(df["path"].tolist(), weights, cache_dir)
    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    w = sample_weights(y, pats)

    def fit_head(idx: np.ndarray, s: int):
        if pooling == "attention":
            return fit_mil(tiles, y, w, idx, s)
        weight, bias = fit_logistic_head(tiles.mean(1), y, w, idx)
        return (weight, bias), None, None

    def head_logits(head, mu, sd, idx: np.ndarray) -> np.ndarray:
        if pooling == "attention":
            return mil_logits(head, mu, sd, tiles[idx])
        return tiles[idx].mean(1) @ head[0] + head[1]

    fold = grouped_kfold(df, k, seed).to_numpy()
    oof, oof_p, base = np.zeros(len(df)), np.zeros(len(df)), np.zeros(len(df))
    per_fold = []
    for j in range(k):
        te, trv = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
        assert not set(pats[te]) & set(pats[trv])
        part = inner_split(df.iloc[trv], seed + j).to_numpy()
        tr, va = trv[part == "train"], trv[part == "val"]
        inner = fit_head(tr, seed + j)
        temp, note = fit_temperature_guarded(head_logits(*inner, va), y[va])
        head = fit_head(trv, seed + j)
        oof[te] = head_logits(*head, te)
        oof_p[te] = apply_temperature(oof[te], temp)
        base[te] = baseline_probs(whole, y, w, trv, te)
        per_fold.append({"fold": j, "test_patients": sorted(set(pats[te])), "val_patients": sorted(set(pats[va])),
                         "temperature": temp, "temperature_fit": note,
                         **fold_figures(y[te], oof_p[te], pats[te])})
    final = fit_head(np.arange(len(df)), seed)
    final_temp = fit_temperature_guarded(oof, y)[0]

    model, rec = build_model("tiles", weights, {"backbone": "efficientnet_lite2", "pooling": pooling})
    with torch.no_grad():
        if pooling == "attention":
            m, mu, sd = final
            model.head.load_state_dict(m.state_dict())
            model.feat_mean.copy_(torch.from_numpy(mu).float())
            model.feat_std.copy_(torch.from_numpy(sd).float())
        else:
            model.head.weight.copy_(torch.from_numpy(final[0][0]).float().unsqueeze(0))
            model.head.bias.fill_(float(final[0][1]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({kk: (v.half() if v.is_floating_point() else v).contiguous() for kk, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    write_split_csv(df.assign(part="train", cv_fold=fold), out / "split.csv", ["part", "cv_fold"])
    pred = pd.DataFrame({"path": df["path"], "patient": pats, "label": y, "magnification": df["magnification"],
                         "source": df["source"], "cv_fold": fold, "part": "train", "logit": oof, "p_malignant": oof_p,
                         "p_baseline": base})
    pred = pd.concat([pred, quality_table(df["path"].tolist())], axis=1)
    pred.to_csv(out / "predictions.csv", index=False)
    cfg = tile_preprocess_config()
    n = counts(df)
    card = ModelCard(
        model_id=f"{out.parent.name}/{out.name}", architecture="tiles", magnification=magnification, preprocess=cfg,
        init={**rec, "description": rec["description"] + " (frozen: only the tile-pooling head is trained)"},
        arch_config={"backbone": "efficientnet_lite2", "pooling": pooling}, temperature=final_temp,
        weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": "tiles_mil" if pooling == "attention" else "tiles_mean_lr",
                "description": ("frozen ImageNet Lite2 embedding of each native 230x233 tile; "
                                + ("gated attention-MIL head (Ilse et al. 2018), 60 epochs AdamW" if pooling == "attention"
                                   else "mean of the tile embeddings + logistic regression")),
                "final_model_schedule": {"source": "fixed schedule on every patient",
                                         "temperature_source": "fitted on the pooled out-of-fold logits (guarded)"}},
        hyperparameters={"pooling": pooling, "cv_folds": k, "seed": seed, "eval_tta": False},
        data={"source": str(data), "magnification": magnification, "all": n,
              "final_model": {"train": n, "val": counts(df.iloc[:0])}, "skipped": [{"path": p, "reason": r} for p, r in index.skipped]},
        evaluation={"protocol": f"{k}-fold stratified patient-grouped cross-validation; out-of-fold predictions of patients "
                                "never seen by their fold's head are the test set; per-fold temperature from inner "
                                "validation patients", "per_fold": per_fold},
        baseline={"description": "frozen ImageNet EfficientNet-Lite2 whole-frame features + logistic regression (C=1), same folds"},
        training_time_s=round(time.time() - t0, 1), versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        limitations=[f"Trained and evaluated on {df['patient'].nunique()} patients ({n['benign']['patients']} benign, "
                     f"{n['malignant']['patients']} malignant): confidence intervals are wide.",
                     "Tiles are tied to BreakHis's pixel scale: images from another scanner or lab come at another "
                     "scale, where this model may not transfer (whole-frame fine-tuned models held up better there).",
                     "Frame-level model: it sees one 700x460 field of view, not a whole slide."],
        changelog=[f"{_dt.date.today().isoformat()}: trained by `python -m training train-tiles`"])
    apply_scores(card, scores_from_predictions(pred, magnification == ALL, n_boot, seed), out)
    card.to_json(out / "card.json")
    return card


def recipe_of(hyperparameters: dict) -> dict:
    """What must match between repeats of one recipe: everything but the seeds and eval_tta (8-view TTA scoring of
    the same fold models: evaluation only); a card from before world_size was recorded trained in one process."""
    return {"world_size": 1, **{k: v for k, v in hyperparameters.items() if k not in ("seed", "train_seed", "eval_tta")}}


def read_repeat_runs(df: pd.DataFrame, folders: list[Path], k: int = 5, seed_ensemble: bool = False) -> dict:
    """Runs of one `train` command with different seeds, checked (same recipe, distinct seeds, frozen-cv's folds) and
    read back: per-run out-of-fold logits on df's rows, per-fold AUCs, temperature fallbacks, and the primary run
    of each split seed (training seed = split seed where there is one).

    seed_ensemble=True reads the runs as a seed ensemble (issue 25): each split seed's logits are the mean over all its
    runs (every run a member, none selected; every split seed must have the same number of members), and the per-fold
    AUCs are those of that mean."""
    from models.card import ModelCard

    names = df["path"].map(lambda p: Path(p).name).to_numpy()
    cards = [ModelCard.from_json(Path(f) / "card.json") for f in folders]
    if any(recipe_of(c.hyperparameters) != recipe_of(cards[0].hyperparameters)
           or c.architecture != cards[0].architecture for c in cards):
        raise ValueError("the runs differ in more than --seed/--train-seed: not repeats of one recipe")
    seeds = [int(c.hyperparameters["seed"]) for c in cards]
    # cards written before --train-seed existed trained with their split seed
    train_seeds = [int(c.hyperparameters.get("train_seed", c.hyperparameters["seed"])) for c in cards]
    pairs = list(zip(seeds, train_seeds))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"repeated (split seed, training seed) pairs {pairs}: each run needs its own seeds")
    split_seeds = sorted(set(seeds))
    run_oof, run_fold_aucs, run_fallbacks, minutes = np.zeros((len(cards), len(df))), [], [], []
    for i, (f, c) in enumerate(zip(folders, cards)):
        pred = pd.read_csv(Path(f) / "predictions.csv")
        pred.index = pred["path"].map(lambda p: Path(p).name)
        pred = pred.loc[names]
        expect = grouped_kfold(df, k, seeds[i]).to_numpy()
        if not (pred["cv_fold"].to_numpy() == expect).all():
            raise ValueError(f"{f}: its folds are not frozen-cv's folds for seed {seeds[i]}")
        run_oof[i] = pred["logit"].to_numpy(float)
        folds = c.evaluation.get("per_fold", [])
        run_fold_aucs.append([x["auc"] for x in folds])
        run_fallbacks.append(sum("fallback" in str(x.get("temperature_fit", "")) for x in folds))
        minutes.append(round(c.training_time_s / 60, 1))
    # One run per split seed in the summary (training seed = split seed where there is one), as every other
    # recipe has: averaging several training seeds' logits would be an ensemble the others do not get.
    primary = [min((i for i, s in enumerate(seeds) if s == ss), key=lambda i: (train_seeds[i] != ss, train_seeds[i]))
               for ss in split_seeds]
    out = {"cards": cards, "recipe": recipe_of(cards[0].hyperparameters), "seeds": seeds, "train_seeds": train_seeds,
           "pairs": pairs,
           "split_seeds": split_seeds, "run_oof": run_oof, "run_fold_aucs": run_fold_aucs,
           "run_fallbacks": run_fallbacks, "minutes": minutes, "primary": primary, "oof": run_oof[primary]}
    if seed_ensemble:
        from models.metrics import _safe_auc

        members = {ss: [i for i, s in enumerate(seeds) if s == ss] for ss in split_seeds}
        counts = {ss: len(m) for ss, m in members.items()}
        if len(set(counts.values())) != 1 or min(counts.values()) < 2:
            raise ValueError(f"a seed ensemble needs the same number (>= 2) of runs on every split seed, not {counts}")
        y = (df["label"] == "malignant").astype(int).to_numpy()
        out["oof"] = np.stack([run_oof[members[ss]].mean(0) for ss in split_seeds])
        out["ensemble_fold_aucs"] = [
            [_safe_auc(y[fold == j], z[fold == j]) for j in range(k)]
            for z, fold in ((out["oof"][n], grouped_kfold(df, k, ss).to_numpy()) for n, ss in enumerate(split_seeds))]
        out["members_per_split_seed"] = counts[split_seeds[0]]
    return out


def trained_runs_cv(df: pd.DataFrame, folders: list[Path], whole: np.ndarray, tiles: np.ndarray, n_boot: int = 1000,
                    k: int = 5, incumbent: list[Path] | None = None, seed_ensemble: bool = False) -> dict:
    """Rule 1 for a trained recipe: the same `train` command run once per (--seed, --train-seed), read back from each
    run's out-of-fold predictions.csv. --seed draws the folds (each run must hold the frozen-cv folds of its seed:
    checked); runs sharing a split seed but not a training seed measure the training-seed spread on fixed folds,
    reported apart from the summary (one run per split seed, as for every recipe). The split-seed-averaged logits are
    compared, frame by frame on identical folds, with the frozen whole-frame and mean-tile logistic regressions and,
    given its runs on the same split seeds, the routed incumbent's recipe, by paired patient bootstraps.
    seed_ensemble=True: each split seed's runs are one seed ensemble (read_repeat_runs), summarised as such."""
    from models.metrics import _safe_auc

    y = (df["label"] == "malignant").astype(int).to_numpy()
    pats = df["patient"].astype(str).to_numpy()
    mags = df["magnification"].to_numpy()
    rr = read_repeat_runs(df, folders, k, seed_ensemble)
    cards, seeds, train_seeds, pairs, split_seeds = rr["cards"], rr["seeds"], rr["train_seeds"], rr["pairs"], rr["split_seeds"]
    run_oof, run_fold_aucs, run_fallbacks, minutes, primary = (rr["run_oof"], rr["run_fold_aucs"], rr["run_fallbacks"],
                                                                rr["minutes"], rr["primary"])
    oof = rr["oof"]
    fold_aucs = ([a for per_seed in rr["ensemble_fold_aucs"] for a in per_seed] if seed_ensemble
                 else [a for i in primary for a in run_fold_aucs[i]])
    # An ensemble's out-of-fold logits come from every member, so its fallbacks are counted over every member's folds.
    temp_fallbacks = (f"{sum(run_fallbacks)}/{len(run_fallbacks) * k} member folds" if seed_ensemble
                      else f"{sum(run_fallbacks[i] for i in primary)}/{len(fold_aucs)}")
    spread = {}
    for ss in split_seeds:
        rows = [i for i, s in enumerate(seeds) if s == ss]
        if len(rows) > 1:
            aucs = [_safe_auc(y, run_oof[i]) for i in rows]
            spread[str(ss)] = {"train_seeds": [train_seeds[i] for i in rows], "pooled_auc": aucs,
                               "per_fold_auc_mean": [float(np.nanmean(run_fold_aucs[i])) for i in rows],
                               "temperature_fallbacks": [run_fallbacks[i] for i in rows],
                               "sd": float(np.std(aucs, ddof=1)), "range": float(max(aucs) - min(aucs)),
                               "ensemble_auc": _safe_auc(y, run_oof[rows].mean(0))}
    w = sample_weights(y, pats)
    ref, ref_aucs = _repeated_oof(df, ["whole_lr", "tiles_mean_lr"], lambda n, tr, te, seed: _lr(
        whole if n == "whole_lr" else tiles.mean(1), y, w, tr, te), tuple(split_seeds), k)
    out = {"protocol": f"{len(cards)} runs of one `train` command, split seeds {split_seeds} (--seed draws the folds; "
                       f"fold f trains with --train-seed + f, default --seed + f), {k} stratified patient-grouped folds "
                       "each, identical to frozen-cv's folds for those seeds; one run per split seed in the summaries "
                       "(its training seed = the split seed), on the split-seed-averaged out-of-fold logits like every "
                       "recipe here; further training seeds on a split seed's folds reported as that split seed's "
                       "training-seed spread; paired patient-bootstrap AUC differences on the same frames and folds",
           "runs": [str(f) for f in folders], "seeds": split_seeds, "run_seeds": [list(p) for p in pairs],
           "model_id": cards[0].model_id, "magnification": cards[0].magnification,
           "architecture": cards[0].architecture, "hyperparameters": rr["recipe"], "n_images": int(len(df)),
           "training_minutes_per_run": minutes, "folds_with_temperature_fallback": temp_fallbacks,
           "training_seed_spread": spread,
           "recipe": recipe_summary(y, pats, mags, oof, fold_aucs, ref["whole_lr"], n_boot)}
    if seed_ensemble:
        out["seed_ensemble"] = True
        out["protocol"] = (f"a seed ensemble of {rr['members_per_split_seed']} training seeds on each of split seeds "
                           f"{split_seeds} ({len(cards)} runs of one `train` command; every run a member, none "
                           f"selected): each split seed's out-of-fold logits are the mean of its members', {k} stratified "
                           "patient-grouped folds each, identical to frozen-cv's folds; summarised on the "
                           "split-seed-averaged ensemble logits; paired patient-bootstrap AUC differences on the same "
                           "frames and folds")
    out["recipe"]["vs_whole_lr"] = out["recipe"].pop("vs_reference")
    out["recipe"]["vs_tiles_mean_lr"] = paired_auc_difference(y, oof.mean(0), ref["tiles_mean_lr"].mean(0), pats,
                                                              n_boot=n_boot)
    out["references"] = {n: recipe_summary(y, pats, mags, ref[n], ref_aucs[n], None, n_boot) for n in ref}
    if incumbent:
        inc = read_repeat_runs(df, incumbent, k)
        if inc["split_seeds"] != split_seeds:
            raise ValueError(f"the incumbent's split seeds {inc['split_seeds']} are not {split_seeds}: not the same folds")
        out["recipe"]["vs_incumbent"] = {"incumbent": inc["cards"][0].model_id, "runs": [str(f) for f in incumbent],
                                         **paired_auc_difference(y, oof.mean(0), inc["oof"].mean(0), pats, n_boot=n_boot)}
    return out
