"""The eight BreakHis subtypes, flat and hierarchical, under patient-grouped CV (issue 17, first part).

Recipe: frozen ImageNet Lite2 embeddings of the frame's native-resolution 2x3 tiles, averaged (the strongest
frozen recipe of the generalisation work), then multinomial logistic regression. Flat: one 8-class head.
Hierarchical (as in the published binary-then-subtype systems): a benign/malignant head, a benign-subtype head
trained on benign frames and a malignant-subtype head trained on malignant frames; P(subtype) = P(parent) x
P(subtype | parent), so the subtype always agrees with the binary call.

Evaluation: 3 split seeds x 5 folds stratified by subtype and grouped by patient; out-of-fold probabilities
averaged over the seeds; per-class recall/precision, balanced accuracy and macro-F1 over the classes with enough
patients to test, the confusion matrix, and patient-level accuracy, each with a patient-bootstrap 95% CI. The same
recipe on an image-wise random split (frames of one patient on both sides) is reported beside it, labelled as
leakage, to show how much such splits inflate subtype scores.

    python -m training subtype-cv --data ../shared/data/breakhis --out benchmarks/results/subtype_cv.json
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from training.engine import sample_weights
from training.splits import stratified_group_folds

log = logging.getLogger("training")

from models.subtype import BENIGN_SUBTYPES, MALIGNANT_SUBTYPES, SUBTYPES, subtype_given_binary, subtype_label

MIN_TEST_PATIENTS = 3  # fewer: a tested patient leaves at most one of its class to learn from; reported, not averaged
STRATEGIES = ("flat", "hierarchical")
ROUTED_PARENT = "hierarchical, parent = routed model"


def subtype_codes(df: pd.DataFrame) -> np.ndarray:
    """Index into SUBTYPES per row; an unknown subtype is refused (never mapped silently to a class)."""
    unknown = sorted(set(df["subtype"]) - set(SUBTYPES))
    if unknown:
        raise ValueError(f"unknown subtype label(s) {unknown}; expected one of {list(SUBTYPES)}")
    return df["subtype"].map({s: i for i, s in enumerate(SUBTYPES)}).to_numpy()


@dataclass
class LinearHead:
    """Softmax regression over `classes` on raw features (the standardisation folded in), so the same numbers can
    be copied into a torch Linear; a class absent from the training rows gets bias -inf (probability 0)."""

    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)

    def log_proba(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.weight.T + self.bias
        finite = np.isfinite(self.bias)
        m = z[:, finite].max(1, keepdims=True)
        return z - (m + np.log(np.exp(z[:, finite] - m).sum(1, keepdims=True)))

    def proba(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(x))


def _fit_lr(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: np.ndarray) -> LinearHead:
    """A multinomial LR on standardised features, returned as a LinearHead over `classes` (absent ones get 0)."""
    k, d = len(classes), x.shape[1]
    weight, bias = np.zeros((k, d)), np.full(k, -np.inf)
    present = np.unique(y)
    if len(present) == 1:
        bias[np.searchsorted(classes, present[0])] = 0.0
        return LinearHead(weight, bias)
    sc = StandardScaler().fit(x)
    # each patient weighs the same within its class and each class the same: a patient with 80 frames must not
    # outvote four with 5, nor the commonest subtype drown the rare ones
    lr = LogisticRegression(C=0.05, max_iter=2000).fit(sc.transform(x), y, sample_weight=sample_weights(y, groups, present))
    coef, icpt = lr.coef_, lr.intercept_
    if len(present) == 2:  # sklearn's binary LR: p1 = sigmoid(z) = softmax([0, z])[1]
        coef, icpt = np.vstack([np.zeros(d), coef[0]]), np.array([0.0, icpt[0]])
    rows = np.searchsorted(classes, lr.classes_)
    weight[rows] = coef / sc.scale_
    bias[rows] = icpt - (coef / sc.scale_) @ sc.mean_
    return LinearHead(weight, bias)


@dataclass
class SubtypeHeads:
    """The fitted heads of one strategy: {"flat"} or {"parent", "benign", "malignant"}; call it for (N, 8) P(subtype)."""

    strategy: str
    heads: dict[str, LinearHead]

    def __call__(self, xt: np.ndarray) -> np.ndarray:
        if self.strategy == "flat":
            return self.heads["flat"].proba(xt)
        pp = self.heads["parent"].proba(xt)
        return np.hstack([pp[:, :1] * self.heads["benign"].proba(xt), pp[:, 1:] * self.heads["malignant"].proba(xt)])

    def load_into(self, head) -> None:
        """Copy the heads into a models.subtype.SubtypeHead (every class must have been seen)."""
        import torch

        with torch.no_grad():
            for name, h in self.heads.items():
                if not np.isfinite(h.bias).all():
                    raise ValueError(f"the {name} head never saw some of its classes; cannot ship it")
                lin = getattr(head, name)
                lin.weight.copy_(torch.from_numpy(h.weight).float())
                lin.bias.copy_(torch.from_numpy(h.bias).float())


def fit_subtype_model(x: np.ndarray, codes: np.ndarray, groups: np.ndarray, strategy: str) -> SubtypeHeads:
    """The heads of `strategy` fitted on (x, codes); calling the result maps features to (N, 8) probabilities."""
    allc = np.arange(len(SUBTYPES))
    if strategy == "flat":
        return SubtypeHeads("flat", {"flat": _fit_lr(x, codes, groups, allc)})
    if strategy != "hierarchical":
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    nb = len(BENIGN_SUBTYPES)
    malignant = (codes >= nb).astype(int)
    return SubtypeHeads("hierarchical", {
        "parent": _fit_lr(x, malignant, groups, np.array([0, 1])),
        "benign": _fit_lr(x[malignant == 0], codes[malignant == 0], groups[malignant == 0], allc[:nb]),
        "malignant": _fit_lr(x[malignant == 1], codes[malignant == 1] - nb, groups[malignant == 1], allc[:len(MALIGNANT_SUBTYPES)]),
    })


def subtype_calls(prob: np.ndarray, hierarchical: bool) -> np.ndarray:
    """The called subtype per row. Hierarchical: the binary call first (P(malignant) = the malignant subtypes'
    sum >= 0.5), then the likeliest subtype within it, so the subtype always agrees with the binary call (the
    argmax of the products alone need not). Flat: the likeliest of the eight."""
    if not hierarchical:
        return prob.argmax(1)
    nb = len(BENIGN_SUBTYPES)
    malignant = prob[:, nb:].sum(1) >= 0.5
    return np.where(malignant, nb + prob[:, nb:].argmax(1), prob[:, :nb].argmax(1))


def subtype_metrics(codes: np.ndarray, prob: np.ndarray, patients: np.ndarray, testable: list[int],
                    hierarchical: bool = False) -> dict:
    """Per-class recall/precision/F1, balanced accuracy and macro-F1 over the testable classes, patient accuracy
    (a patient = its frames' mean probabilities), and the row-normalised confusion matrix."""
    pred = subtype_calls(prob, hierarchical)
    k = len(SUBTYPES)
    cm = np.zeros((k, k))
    np.add.at(cm, (codes, pred), 1)
    out: dict = {}
    f1s, recs = [], []
    for c in range(k):
        tp, n_true, n_pred = cm[c, c], cm[c].sum(), cm[:, c].sum()
        rec = tp / n_true if n_true else np.nan
        prec = tp / n_pred if n_pred else np.nan
        f1 = 2 * tp / (n_true + n_pred) if n_true + n_pred else np.nan
        out[f"recall/{SUBTYPES[c]}"], out[f"precision/{SUBTYPES[c]}"] = rec, prec
        if c in testable:
            recs.append(rec)
            f1s.append(f1)
    out["balanced_accuracy"] = float(np.nanmean(recs)) if recs else np.nan
    out["macro_f1"] = float(np.nanmean(f1s)) if f1s else np.nan
    out["accuracy"] = float((pred == codes).mean())
    nb = len(BENIGN_SUBTYPES)
    out["binary_accuracy"] = float(((pred >= nb) == (codes >= nb)).mean())
    pt = pd.DataFrame(prob).groupby(patients).mean()
    truth = pd.Series(codes).groupby(patients).agg(lambda s: s.mode().iloc[0])
    out["patient_accuracy"] = float((subtype_calls(pt.to_numpy(), hierarchical) == truth.loc[pt.index].to_numpy()).mean())
    rows = cm.sum(1, keepdims=True)
    for i in range(k):
        for j in range(k):
            out[f"cm/{i}/{j}"] = cm[i, j] / rows[i, 0] if rows[i, 0] else np.nan
    return out


def _bootstrap(codes: np.ndarray, prob: np.ndarray, patients: np.ndarray, testable: list[int], n_boot: int,
               hierarchical: bool, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile CIs resampling patients within their (most frequent) subtype, so every class keeps its count."""
    rng = np.random.default_rng(seed)
    groups = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    strata: dict[int, list] = {}
    for p, idx in groups.items():
        strata.setdefault(int(np.bincount(codes[idx]).argmax()), []).append(p)
    samples: dict[str, list] = {}
    for b in range(n_boot):
        idx, pats = [], []
        for c, ps in strata.items():
            for j, p in enumerate(rng.choice(ps, size=len(ps), replace=True)):
                idx.append(groups[p])
                pats += [f"{p}#{c}_{j}"] * len(groups[p])
        idx = np.concatenate(idx)
        for key, v in subtype_metrics(codes[idx], prob[idx], np.array(pats), testable, hierarchical).items():
            samples.setdefault(key, []).append(v)
    out = {}
    for key, vals in samples.items():
        v = np.asarray(vals, float)
        v = v[np.isfinite(v)]
        out[key] = (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (np.nan, np.nan)
    return out


def _folds(codes: np.ndarray, patients: np.ndarray, k: int, seed: int, leakage: bool) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():  # classes with fewer patients than folds: sklearn warns; we report it instead
        warnings.simplefilter("ignore", UserWarning)
        if not leakage:
            return stratified_group_folds(codes, patients, k, seed)
        fold = np.full(len(codes), -1)
        for i, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(codes)), codes)):
            fold[te] = i
        return fold


def out_of_fold(x: np.ndarray, codes: np.ndarray, patients: np.ndarray, strategy: str, split_seeds=(0, 1, 2),
                k: int = 5, leakage: bool = False) -> np.ndarray:
    """(N, 8) out-of-fold probabilities averaged over split seeds; patient-disjoint folds unless leakage=True."""
    acc = np.zeros((len(split_seeds), len(codes), len(SUBTYPES)))
    for si, seed in enumerate(split_seeds):
        fold = _folds(codes, patients, k, seed, leakage)
        for j in range(k):
            te, tr = np.flatnonzero(fold == j), np.flatnonzero(fold != j)
            if not leakage:
                assert not set(patients[te]) & set(patients[tr]), "subtype folds share a patient"
            acc[si, te] = fit_subtype_model(x[tr], codes[tr], patients[tr], strategy)(x[te])
    return acc.mean(0)


def _report(codes, prob, patients, testable, n_boot, hierarchical: bool) -> dict:
    point = subtype_metrics(codes, prob, patients, testable, hierarchical)
    ci = _bootstrap(codes, prob, patients, testable, n_boot, hierarchical)
    return {key: {"value": None if not np.isfinite(v) else float(v), "ci95": list(ci.get(key, (np.nan, np.nan)))}
            for key, v in point.items()}


def subtype_cv(df: pd.DataFrame, x: np.ndarray, strategies=STRATEGIES, split_seeds=(0, 1, 2), k: int = 5,
               n_boot: int = 500, parent: tuple[str, np.ndarray] | None = None) -> dict:
    """Both strategies, patient-grouped and (labelled leakage) image-wise, with class patient counts.

    parent: (model id, its out-of-fold p_malignant per row) of the routed benign/malignant model: adds the subtype
    as the dashboard shows it, P(parent) from that model x the hierarchical model's P(subtype | parent)."""
    codes = subtype_codes(df)
    patients = df["patient"].astype(str).to_numpy()
    n_pat = {s: int(df.loc[df["subtype"] == s, "patient"].nunique()) for s in SUBTYPES}
    testable = [i for i, s in enumerate(SUBTYPES) if n_pat[s] >= MIN_TEST_PATIENTS]
    out = {"protocol": f"{len(split_seeds)} split seeds x {k} folds stratified by subtype; patient-grouped unless "
                       "marked leakage; frozen ImageNet Lite2 mean native-tile embedding + multinomial logistic "
                       "regression (C=0.05, patient- and class-balanced weights); out-of-fold probabilities averaged "
                       "over split seeds; 95% CIs from resampling patients within their subtype",
           "classes": list(SUBTYPES), "n_patients": n_pat,
           "n_frames": {s: int((df["subtype"] == s).sum()) for s in SUBTYPES},
           "testable": [SUBTYPES[i] for i in testable],
           "not_testable": {SUBTYPES[i]: f"{n_pat[SUBTYPES[i]]} patient(s): too few to test (needs "
                                         f"{MIN_TEST_PATIENTS}); shown, not averaged in"
                            for i in range(len(SUBTYPES)) if i not in testable},
           "n_images": int(len(df)), "patients_total": int(df["patient"].nunique()), "results": {}}
    for strategy in strategies:
        for leakage in (False, True):
            name = f"{strategy}{' (image-wise split: LEAKAGE)' if leakage else ''}"
            log.info("subtype CV: %s", name)
            prob = out_of_fold(x, codes, patients, strategy, split_seeds, k, leakage)
            hier = strategy == "hierarchical"
            out["results"][name] = _result(strategy, leakage, codes, prob, patients, testable, n_boot, hier)
            if parent is not None and hier and not leakage:
                log.info("subtype CV: %s", ROUTED_PARENT)
                routed = np.stack([subtype_given_binary(p, pm) for p, pm in zip(prob, parent[1])])
                out["results"][ROUTED_PARENT] = {**_result(ROUTED_PARENT, False, codes, routed, patients, testable,
                                                           n_boot, True), "parent_model": parent[0]}
    return out


def _result(strategy: str, leakage: bool, codes, prob, patients, testable, n_boot: int, hier: bool) -> dict:
    return {"strategy": strategy, "leakage": leakage,
            "metrics": _report(codes, prob, patients, testable, n_boot, hier),
            "confusion_counts": np.histogram2d(codes, subtype_calls(prob, hier), bins=[
                np.arange(len(SUBTYPES) + 1)] * 2)[0].astype(int).tolist()}


def markdown_tables(res: dict) -> str:
    """README tables from subtype_cv's JSON."""
    def f(m):
        v, (lo, hi) = m["value"], m["ci95"]
        return "—" if v is None else f"{v:.2f} ({lo:.2f}–{hi:.2f})"

    lines = [f"{res['n_images']} frames, {res['patients_total']} patients. Protocol: {res['protocol']}.", "",
             "| strategy | split | balanced accuracy (testable classes) | macro-F1 (testable classes) | 8-class "
             "accuracy | benign/malignant accuracy | patient accuracy |", "|---|---|---|---|---|---|---|"]
    for name, r in res["results"].items():
        m = r["metrics"]
        lines.append(f"| {r['strategy']} | {'image-wise (leakage)' if r['leakage'] else 'patient-grouped'} | "
                     f"{f(m['balanced_accuracy'])} | {f(m['macro_f1'])} | {f(m['accuracy'])} | "
                     f"{f(m['binary_accuracy'])} | {f(m['patient_accuracy'])} |")
    grouped = [name for name, r in res["results"].items() if not r["leakage"]]
    lines += ["", "Per class, patient-grouped (recall and precision with 95% CI; frames / patients):", "",
              "| subtype | patients | frames | " + " | ".join(
                  f"{s} recall | {s} precision" for s in grouped) + " |",
              "|---|---|---|" + "---|---|" * len(grouped)]
    for s in res["classes"]:
        cells = []
        for strategy in grouped:
            m = res["results"][strategy]["metrics"]
            cells += [f(m[f"recall/{s}"]), f(m[f"precision/{s}"])]
        note = "" if s in res["testable"] else " (too few patients to test)"
        lines.append(f"| {s}{note} | {res['n_patients'][s]} | {res['n_frames'][s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routed_parent(df: pd.DataFrame, model_folder: str | Path) -> tuple[str, np.ndarray]:
    """(model id, out-of-fold p_malignant per row of df) from a malignancy model's predictions.csv, matched by file
    name; every frame must be there (a frame the model trained on without an out-of-fold prediction is refused)."""
    from models.card import ModelCard

    folder = Path(model_folder)
    card = ModelCard.from_json(folder / "card.json")
    if card.task_kind != "malignancy":
        raise ValueError(f"{folder}: a {card.task_kind} model is not a benign/malignant parent")
    path = folder / "predictions.csv"
    pred = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if "cv_fold" not in pred or "p_malignant" not in pred:
        raise ValueError(f"{path}: no out-of-fold p_malignant (columns cv_fold, p_malignant)")
    by_name = pred.assign(name=pred["path"].map(lambda p: Path(p).name)).set_index("name")["p_malignant"]
    names = df["path"].map(lambda p: Path(p).name)
    missing = sorted(set(names) - set(by_name.index))
    if missing:
        raise ValueError(f"{folder}: no out-of-fold prediction for {len(missing)} frame(s), e.g. {missing[:2]}")
    return card.model_id, by_name.loc[names].to_numpy(float)


def train_subtype_model(data: str | Path, out: Path, weights: str, strategy: str = "hierarchical",
                        magnification: str = "all", split_seeds=(0, 1, 2), k: int = 5, n_boot: int = 500,
                        parent_model: str | Path | None = None, cache_dir: Path | None = None):
    """Ship a subtype model: frozen ImageNet Lite2 per native tile, mean-pooled, the `strategy` heads (fitted on
    every frame) folded into a models.subtype.SubtypeHead; its card carries the whole subtype CV (both strategies,
    patient-grouped and the image-wise leakage contrast, and, given the routed model, the subtype as Diagnose shows it)."""
    import datetime as _dt
    import time

    from safetensors.torch import save_file

    from models.archs import build_model, file_sha256
    from models.card import ModelCard
    from training.data import default_cache_dir, index_source
    from training.frozen_cv import frozen_features, tile_preprocess_config
    from training.splits import write_split_csv
    from training.train import git_commit, select_rows, versions

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}")
    t0 = time.time()
    cache_dir = Path(cache_dir or default_cache_dir())
    df = select_rows(index_source(data, cache_dir), magnification).reset_index(drop=True)
    codes = subtype_codes(df)
    absent = [s for i, s in enumerate(SUBTYPES) if i not in set(codes)]
    if absent:
        raise ValueError(f"no frames of {absent}: a subtype model needs every one of the eight classes")
    _, tiles = frozen_features(df["path"].tolist(), weights, cache_dir)
    x, pats = tiles.mean(1), df["patient"].astype(str).to_numpy()
    parent = routed_parent(df, parent_model) if parent_model else None
    cv = subtype_cv(df, x, split_seeds=split_seeds, k=k, n_boot=n_boot, parent=parent)
    heads = fit_subtype_model(x, codes, pats, strategy)
    arch_config = {"backbone": "efficientnet_lite2", "pooling": "mean", "subtype_head": strategy,
                   "classes": list(SUBTYPES)}
    model, rec = build_model("tiles", weights, arch_config)
    heads.load_into(model.head)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({kk: (v.half() if v.is_floating_point() else v).contiguous() for kk, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    oof = out_of_fold(x, codes, pats, strategy, split_seeds, k)
    write_split_csv(df.assign(part="train"), out / "split.csv", ["part"])
    pred = pd.DataFrame({"path": df["path"], "patient": pats, "magnification": df["magnification"],
                         "subtype": df["subtype"], **{f"p_{s}": oof[:, i] for i, s in enumerate(SUBTYPES)}})
    pred.to_csv(out / "predictions.csv", index=False)
    res = cv["results"][strategy]["metrics"]
    ba = res["balanced_accuracy"]
    chance = 1.0 / len(cv["testable"])
    card = ModelCard(
        model_id=f"{out.parent.name}/{out.name}", architecture="tiles", magnification=magnification,
        preprocess=tile_preprocess_config(), arch_config=arch_config, task_kind="subtype",
        task="the eight BreakHis subtypes of an H&E frame (benign: " + ", ".join(BENIGN_SUBTYPES) + "; malignant: "
             + ", ".join(MALIGNANT_SUBTYPES) + ")",
        output="8 log-probabilities over arch_config.classes; p_subtype = exp(output)",
        init={**rec, "description": rec["description"] + " (frozen: only the subtype heads are trained)"},
        weights_sha256=file_sha256(out / "model.safetensors"),
        recipe={"name": f"subtype_{strategy}_frozen_tiles",
                "description": f"frozen ImageNet Lite2 embedding of the frame's 2x3 native-resolution tiles, mean-pooled; "
                               + ("one 8-class multinomial logistic regression" if strategy == "flat" else
                                  "a benign/malignant logistic regression, a benign-subtype and a malignant-subtype one; "
                                  "P(subtype) = P(parent) x P(subtype | parent)")
                               + " (C=0.05, patient- and class-balanced weights), standardisation folded into the heads",
                "probabilities": "not calibrated (no temperature): read them as a ranking, with the class's CV recall"},
        hyperparameters={"C": 0.05, "strategy": strategy},
        data={"source": str(data), "frames": int(len(df)), "patients": int(len(set(pats))),
              "patients_per_class": cv["n_patients"], "frames_per_class": cv["n_frames"]},
        split_file="predictions.csv",
        evaluation={"protocol": cv["protocol"], "strategy": strategy, "subtype_cv": cv},
        training_time_s=time.time() - t0, versions=versions(), git_commit=git_commit(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        intended_use="Research aid: which of the eight BreakHis subtypes a frame resembles, shown with each class's "
                     "patient-grouped CV recall. Not a diagnosis; not validated for clinical use; weak on this sample.",
        limitations=[
            f"{len(set(pats))} patients in all; patients per class: "
            + ", ".join(f"{subtype_label(s)} {n}" for s, n in cv["n_patients"].items())
            + f". Classes with fewer than {MIN_TEST_PATIENTS} patients ({', '.join(map(subtype_label, cv['not_testable'])) or 'none'}) "
              "could not be tested and are not averaged in.",
            f"Patient-grouped balanced accuracy {ba['value']:.2f} ({ba['ci95'][0]:.2f}-{ba['ci95'][1]:.2f}) against "
            f"{chance:.2f} by chance over the {len(cv['testable'])} testable classes: the subtype is barely better than "
            "a guess on patients the model never saw; the image-wise (leaky) split scores far higher and is shown "
            "only as a warning.",
            "Probabilities are not calibrated.",
            "The backbone is frozen ImageNet Lite2: only linear heads were trained."],
        changelog=[f"{_dt.date.today().isoformat()}: trained by `python -m training train --task subtype --strategy {strategy}`"])
    card.to_json(out / "card.json")
    return card
