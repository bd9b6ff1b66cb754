"""Fit a model's refer-when-unsure policy (`python -m training fit-refer`): the uncertainty band from its out-of-fold
predictions, and the out-of-distribution score from its own embedding of the training frames, measured as AUROC
against generated non-histology images, other-scale histology (IDC patches) and the QC failures."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from models.archs import file_sha256
from models.evidence import OodAudit, OodCounts, OodRates
from models.inference import load_model_folder
from models.metrics import apply_temperature
from models.preprocess import ImageError, load_image
from models.quality import check_quality, qc_failures
from models.refer import OOD_FILE, POLICY_FILE, OODScorer, embed
from training.splits import grouped_kfold

log = logging.getLogger("training")


def risk_coverage(y: np.ndarray, p: np.ndarray, threshold: float, deltas: np.ndarray) -> list[dict]:
    """Accuracy on the frames outside the band threshold +- delta, and the share of frames outside it."""
    out = []
    for d in deltas:
        keep = np.abs(p - threshold) > d
        acc = float(((p[keep] >= threshold).astype(int) == y[keep]).mean()) if keep.any() else float("nan")
        out.append({"half_width": round(float(d), 3), "coverage": float(keep.mean()), "accuracy": acc})
    return out


def choose_band(points: list[dict], target: float, threshold: float) -> tuple[tuple[float, float], dict, str]:
    """The narrowest band whose accepted frames reach the target accuracy (keeping at least 10% of frames);
    where none does, the band with the best accepted accuracy, and a note saying the target was not reached."""
    ok = [r for r in points if r["coverage"] >= 0.10 and r["accuracy"] >= target]
    if ok:
        r, note = ok[0], f"narrowest band reaching {target:.0%} out-of-fold accuracy on accepted frames"
    else:
        cand = [r for r in points if r["coverage"] >= 0.10]
        r = max(cand, key=lambda x: x["accuracy"])
        note = (f"no band reaches {target:.0%} accuracy while keeping 10% of frames; the band with the best accepted "
                f"accuracy ({r['accuracy']:.0%}) is used")
    h = r["half_width"]
    return (max(0.0, threshold - h), min(1.0, threshold + h)), r, note


OOD_KINDS = ("flat", "gradient", "noise", "stripes", "blocks", "text")


def _text_image(rng: np.random.Generator) -> np.ndarray:
    """A rendered page of text (a report or a screenshot) on white, pink or dark paper."""
    from PIL import ImageDraw, ImageFont

    bg = [(255, 255, 255), (240, 200, 230), (30, 30, 30), (200, 120, 190)][int(rng.integers(0, 4))]
    im = Image.new("RGB", (700, 460), bg)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=int(rng.integers(14, 34)))
    for line in range(int(rng.integers(3, 14))):
        draw.text((10, 10 + line * 34), "Histopathology report: invasive ductal carcinoma, grade 2",
                  fill=tuple(int(x) for x in rng.integers(0, 256, 3)), font=font)
    return np.asarray(im)


def ood_corpus(n: int = 48, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Generated non-histology images: flat colours (H&E-like ones included), gradients, noise, stripes, blocks, text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = OOD_KINDS[i % len(OOD_KINDS)]
        if kind == "flat":
            c = rng.integers(0, 256, 3) if i % 2 else np.array([200, 120, 190]) + rng.integers(-20, 20, 3)
            a = np.broadcast_to(np.clip(c, 0, 255), (460, 700, 3)).astype(np.uint8)
        elif kind == "gradient":
            t = np.linspace(0, 1, 700)[None, :, None]
            c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            a = np.broadcast_to(c0 + (c1 - c0) * t, (460, 700, 3)).astype(np.uint8)
        elif kind == "noise":
            a = rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)
        elif kind == "text":
            a = _text_image(rng)
        elif kind == "stripes":
            a = np.zeros((460, 700, 3), np.uint8)
            a[:, (np.arange(700) // rng.integers(5, 40)) % 2 == 1] = rng.integers(0, 256, 3)
        else:
            small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
            a = np.asarray(Image.fromarray(small).resize((700, 460), Image.NEAREST))
        out.append((f"generated-{kind}-{i}", Image.fromarray(np.ascontiguousarray(a))))
    return out


def idc_patches(folder: Path, n: int = 120, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Other-scale histology: 50x50 IDC patches (another collection, another magnification) shown as frames."""
    man = folder / "manifest.csv"
    if not man.is_file():
        return []
    df = pd.read_csv(man, dtype=str).sample(frac=1.0, random_state=seed).head(n)
    return [(r["path"], Image.open(folder / r["path"]).convert("RGB").resize((700, 460), Image.BILINEAR))
            for r in df.to_dict("records")]


def fit_refer(folder: str | Path, idc: str | Path | None = None, target_accuracy: float = 0.85,
              quantile: float = 0.99, pca_dims: int = 32, seed: int = 0) -> dict:
    """Write refer.json and ood.npz into a model folder; returns the policy with its measurements."""
    folder = Path(folder)
    lm = load_model_folder(folder)
    card = lm.card
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str}).dropna(subset=["p_malignant"])
    y = pred["label"].to_numpy(int)
    if "logit" in pred and pred["logit"].notna().all():
        # the out-of-fold logits calibrated as the served model calibrates them (its pooled and per-magnification
        # temperatures), so the band is fitted on the probabilities the page will show
        p = np.array([apply_temperature(z, lm.temperature_for(g)) for z, g in zip(pred["logit"], pred["magnification"])])
    else:
        p = pred["p_malignant"].to_numpy(float)
    points = risk_coverage(y, p, card.threshold, np.round(np.arange(0.0, 0.5, 0.01), 3))
    band, chosen, note = choose_band(points, target_accuracy, card.threshold)

    def emb_of(images: list[Image.Image]) -> np.ndarray:
        out = []
        for im in tqdm(images, desc="embeddings", leave=False):
            out.append(embed(lm.model, lm.preprocess(im).unsqueeze(0))[0])
        return np.stack(out)

    frames, keep = [], []
    for i, path in enumerate(pred["path"]):
        try:
            frames.append(load_image(path).image)
            keep.append(i)
        except ImageError:
            continue
    sub = pred.iloc[keep].reset_index(drop=True)
    E = emb_of(frames)
    # Threshold from held-out training frames: the Gaussian is fitted on 4/5 of the patients and scores the rest.
    folds = grouped_kfold(sub, 5, seed).to_numpy()
    held = np.zeros(len(sub))
    for k in range(folds.max() + 1):
        tr, te = folds != k, folds == k
        held[te] = _scorer(E[tr], pca_dims, 0.0).score(E[te])
    thr = float(np.quantile(held, quantile))
    scorer = _scorer(E, pca_dims, thr)
    # The QC failures among the training frames, and the OOD corpus, scored by the final scorer.
    qc_fail = np.array([bool(qc_failures(check_quality(im))) for im in frames])
    gen = ood_corpus()
    other = idc_patches(Path(idc)) if idc else []
    s_gen = scorer.score(emb_of([im for _, im in gen]))
    s_idc = scorer.score(emb_of([im for _, im in other])) if other else np.zeros(0)

    def auroc(s_out: np.ndarray) -> float | None:
        if not len(s_out):
            return None
        return float(roc_auc_score(np.r_[np.zeros(len(held)), np.ones(len(s_out))], np.r_[held, s_out]))

    gen_ref = [bool(qc_failures(q)) or q.out_of_distribution or sg > thr
               for q, sg in zip((check_quality(im) for _, im in gen), s_gen)]
    kinds = [name.split("-")[1] for name, _ in gen]
    by_kind = {k: float(np.mean([r for r, k2 in zip(gen_ref, kinds) if k2 == k])) for k in sorted(set(kinds))}
    idc_by_rule = (float(np.mean([bool(qc_failures(q)) or q.out_of_distribution or si > thr for q, si in
                                  zip((check_quality(im) for _, im in other), s_idc)])) if len(s_idc) else None)
    # machine keys (models.evidence.OodAudit): the pages read typed fields, never sentences
    ood_auroc = OodAudit(
        generated_auroc=auroc(s_gen), generated_referred_by_kind=by_kind, idc_auroc=auroc(s_idc),
        qc_failures_auroc=auroc(held[qc_fail]) if qc_fail.any() else None,
        n=OodCounts(held_out=int(len(held)), generated=int(len(s_gen)), idc=int(len(s_idc)),
                    qc_failures=int(qc_fail.sum())),
        referred_by_rule=OodRates(generated=float(np.mean(gen_ref)), idc=idc_by_rule),
        referred_at_threshold=OodRates(generated=float((s_gen > thr).mean()),
                                       idc=float((s_idc > thr).mean()) if len(s_idc) else None,
                                       held_out=float((held > thr).mean()))).model_dump()
    scorer.save(folder / OOD_FILE)
    case = fit_case(lm, pred, keep, held, thr, qc_fail, seed)
    pats = sub.groupby("label")["patient"].nunique()
    policy = {"band": list(band), "target_accuracy": target_accuracy, "accepted_accuracy": chosen["accuracy"],
              "coverage": chosen["coverage"], "ood_quantile": quantile, "ood_auroc": ood_auroc,
              "risk_coverage": points, "card_sha256": file_sha256(folder / "card.json"), "n_frames": int(len(pred)),
              "ood_sha256": file_sha256(folder / OOD_FILE),
              "n_patients": {"benign": int(pats.get(0, 0)), "malignant": int(pats.get(1, 0))},
              "case_policy": case,
              "notes": [note, f"band from out-of-fold predictions (predictions.csv) of {len(pred)} frames",
                        f"OOD: squared Mahalanobis distance in a {pca_dims}-dim PCA of the model's pooled embedding, "
                        f"Ledoit-Wolf covariance; threshold = the {quantile:.0%} quantile of held-out training frames' "
                        "distances (5 patient-grouped folds). The embedding is the shipped model's, which saw "
                        "every training frame, so in-distribution distances are slightly optimistic."]}
    (folder / POLICY_FILE).write_text(json.dumps(policy, indent=1) + "\n")
    return policy


def _scorer(E: np.ndarray, dims: int, threshold: float) -> OODScorer:
    pca = PCA(n_components=min(dims, len(E) - 1), random_state=0).fit(E)
    Z = pca.transform(E)
    cov = LedoitWolf().fit(Z)
    resid = (E - pca.mean_) - Z @ pca.components_
    residual_var = float((resid ** 2).sum(1).mean() / (E.shape[1] - pca.n_components_))
    return OODScorer(pca.mean_, pca.components_, cov.precision_, residual_var, threshold)


def fit_case(lm, pred: pd.DataFrame, keep: list[int], held: np.ndarray, ood_threshold: float, qc_fail: np.ndarray,
             seed: int = 0) -> dict | None:
    """The case policy (training.case_policy) on the out-of-fold frames: refused frames (QC failures, held-out OOD
    distances over the threshold, unreadable) do not count; its nested validation scores held-out patients only."""
    from training.case_policy import case_policy_for, nested_case_evaluation, policy_dict

    if "logit" not in pred or pred["logit"].isna().any():
        return None  # no raw out-of-fold logits: no case policy (the case rule then says so on every verdict)
    frames = pd.DataFrame({"patient": pred["patient"].astype(str).to_numpy(), "y": pred["label"].to_numpy(int),
                           "magnification": pred["magnification"].to_numpy(), "logit": pred["logit"].to_numpy(float),
                           "qc_ok": False, "ood_ok": False})
    frames.loc[np.asarray(keep), "qc_ok"] = ~qc_fail
    frames.loc[np.asarray(keep), "ood_ok"] = held <= ood_threshold
    card = lm.card
    by_mag = {g: {"temperature": v.temperature} for g, v in (card.temperature_by_magnification or {}).items()}
    policy, points = case_policy_for(frames, card.temperature, by_mag, seed)
    return policy_dict(policy, points, nested_case_evaluation(frames, seed=seed))


def calibrate_magnifications(folder: str | Path) -> dict:
    """Write a pooled model's per-magnification temperatures into its card (from its out-of-fold logits); the pooled
    temperature stays for magnifications with fewer than 5 out-of-fold patients per class. Refit the refer policy
    (and re-run select-defaults) afterwards: the card's sha256 changes."""
    import datetime as _dt

    from models.card import ModelCard
    from training.case_policy import fit_temperatures

    folder = Path(folder)
    card = ModelCard.from_json(folder / "card.json")
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str}).dropna(subset=["logit"])
    pooled, by_mag = fit_temperatures(pred["logit"].to_numpy(float), pred["label"].to_numpy(int),
                                      pred["magnification"].to_numpy(), pred["patient"].astype(str).to_numpy())
    card.temperature = pooled
    card.temperature_by_magnification = by_mag
    fitted = ", ".join(f"{g} {v['temperature']:.2f}" for g, v in by_mag.items()) or "none"
    card.changelog.append(f"{_dt.date.today().isoformat()}: per-magnification temperatures "
                          f"({fitted}; pooled "
                          f"{pooled:.2f} elsewhere) by `python -m training calibrate-magnifications`")
    card.to_json(folder / "card.json")
    return {"pooled": pooled, "by_magnification": by_mag}
