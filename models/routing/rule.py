"""The routing rule, that noise cannot fool: which model serves each magnification (writes magnif_models/defaults.json).

Rule (issue 18, fixed before any of the compared numbers were seen):
1. The *incumbent* at a magnification is an ImageNet-pretrained model trained on that magnification's frames
   (its own or a pooled model, never a borrowed one), in this order of preference: the reference recipe
   (end-to-end fine-tuning with HED/HSV colour augmentation), then the simplest pretrained model (frozen
   features + logistic regression / linear head), then any other single-network pretrained model. Pooled
   before own-magnification within a tier (more patients behind it). Not the best-validating one: picking the
   best of N on the folds we report is optimistic.
2. Every other candidate is a *challenger*. Its AUC advantage over the incumbent is measured on the same
   frames (out-of-fold or held-out patients only) by a paired patient bootstrap. It displaces the incumbent
   only when the lower end of the 95% CI of that advantage is above zero; with several such, the one with
   the highest lower bound. A run that is a member of the incumbent seed ensemble is not a challenger (routing
   it would pick the luckiest seed, which the ensemble exists to avoid).
3. With no pretrained candidate at all (e.g. a user who trained only from scratch), the highest AUC serves
   and the entry says that the choice is not noise-proof.

Cards are never rewritten here: the evidence lives in defaults.json, which also records each routed card's
sha256 so the app can tell when a card changed after routing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.archs import file_sha256
from models.card import ALL, MAGNIFICATIONS, ModelCard
from models.folders import list_model_folders
from models.metrics import paired_auc_difference
from models.routing.schema import DEFAULTS_FILE
from models.routing.thresholds import few_patients

RULE = ("an ImageNet-pretrained incumbent (reference recipe: end-to-end fine-tuning with colour augmentation, as a "
        "seed ensemble of its runs where one exists; else frozen features + logistic regression) serves unless a challenger's AUC advantage on the same "
        "out-of-fold frames has a paired patient-bootstrap 95% CI entirely above zero")


def is_pretrained(card: ModelCard) -> bool:
    """Single-network model whose backbone started from ImageNet weights (the hybrid's ViT starts from scratch)."""
    init = str(card.init.get("init", "scratch"))
    return card.architecture != "hybrid" and init != "scratch"


def incumbent_tier(card: ModelCard) -> int | None:
    """-1 seed ensemble of the reference recipe, 0 reference recipe, 1 frozen-feature recipe, 2 other pretrained;
    None: not eligible as incumbent. A seed ensemble of the reference recipe (issue 25) is that same recipe with less
    run-to-run variance, every run a member and none selected, so it replaces the single run without a contest (the
    single run still appears as a challenger, and would displace it only by the paired rule)."""
    if not is_pretrained(card):
        return None
    recipe = card.recipe.get("name", "")
    if recipe == "full" and card.hyperparameters.get("colour_augmentation") == "hed":
        return -1 if card.architecture == "seed_ensemble" else 0
    if recipe in ("logreg", "linear"):
        return 1
    return 2


def frame_scores(folder: Path, card: ModelCard, mag: str) -> pd.DataFrame | None:
    """Out-of-fold (or held-out) frame scores of one model at `mag`: frame, patient, label, score, fold."""
    own = card.magnification in (mag, "all")
    path = folder / ("predictions.csv" if own else "predictions_cross_magnification.csv")
    if not path.is_file():
        return None
    p = pd.read_csv(path, dtype={"patient": str})
    p = p[p["magnification"] == mag] if "magnification" in p else p
    col = "logit" if "logit" in p else "p_malignant"  # raw logits: per-fold temperatures would distort the ranking
    p = p[p[col].notna()]
    if p.empty:
        return None
    return pd.DataFrame({"frame": p["path"].astype(str).map(lambda s: Path(s).name), "patient": p["patient"],
                         "label": p["label"].astype(int), "score": p[col].astype(float),
                         "fold": p["cv_fold"] if "cv_fold" in p else -1})


def _same_folds(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two models' out-of-fold predictions came from the same patient partition (fold labels may differ)."""
    def parts(d: pd.DataFrame) -> set:
        g = d.groupby("fold")["patient"].apply(lambda s: frozenset(s))
        return set(g) if (d["fold"] >= 0).all() else {None}
    return None not in parts(a) and parts(a) == parts(b)


def compare(challenger: pd.DataFrame, incumbent: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Paired AUC difference on the frames both models scored out-of-fold."""
    m = challenger.merge(incumbent, on=["frame", "patient", "label"], suffixes=("_c", "_i"))
    if m["label"].nunique() < 2:
        return None
    res = paired_auc_difference(m["label"].to_numpy(), m["score_c"].to_numpy(), m["score_i"].to_numpy(),
                                m["patient"].to_numpy(), n_boot=n_boot, seed=seed)
    res["same_folds"] = _same_folds(challenger[challenger["frame"].isin(m["frame"])],
                                    incumbent[incumbent["frame"].isin(m["frame"])])
    return res


def _kind(card: ModelCard, mag: str) -> str:
    if card.magnification == mag:
        return "own-magnification model"
    if card.magnification == ALL:
        return "pooled model (all magnifications)"
    return f"borrowed {card.magnification} model (cross-magnification check)"


def choose(cands: list[dict], n_boot: int = 2000) -> dict:
    """Apply the rule to one magnification's candidates (each with card, scores and summary fields)."""
    eligible = [c for c in cands if c["tier"] is not None and not c["borrowed"]]
    if not eligible:
        best = max(cands, key=lambda x: (x["auc"], not x["pooled"] and not x["borrowed"], not x["borrowed"]))
        return {"chosen": best, "incumbent": None, "comparisons": [],
                "reason": f"no ImageNet-pretrained candidate: highest cross-validated AUC among {len(cands)} "
                          "(not protected against noise)"}
    inc = min(eligible, key=lambda c: (c["tier"], not c["pooled"], c["model_id"]))
    comps = []
    for c in cands:
        if c is inc:
            continue
        if c.get("weights_sha256") and c["weights_sha256"] in inc.get("member_weights", []):
            # a run that is a member of the incumbent seed ensemble: routing it over its own ensemble on the frames
            # where its seed happened to do better would be picking the luckiest seed, which the ensemble exists to
            # avoid (issue 25); its difference to the ensemble is in the ensemble's card, not a contest
            comps.append({"challenger": c["model_id"], "kind": c["kind"], "difference": None, "ci95": None,
                          "displaces": False, "note": "a member of the incumbent seed ensemble: not a challenger"})
            continue
        r = compare(c["scores"], inc["scores"], n_boot) if c["scores"] is not None and inc["scores"] is not None else None
        row = {"challenger": c["model_id"], "kind": c["kind"]}
        if r is None:
            row.update(difference=None, ci95=None, displaces=False, note="no shared out-of-fold frames with both labels")
        else:
            row.update(difference=r["difference"], ci95=r["ci95"], n_patients=r["n_patients"], n_images=r["n_images"],
                       same_folds=r["same_folds"], displaces=bool(r["ci95"][0] > 0))
        comps.append(row)
    winners = [r for r in comps if r["displaces"]]
    if winners:
        w = max(winners, key=lambda r: r["ci95"][0])
        chosen = next(c for c in cands if c["model_id"] == w["challenger"])
        reason = (f"displaced the pretrained incumbent {inc['model_id']}: AUC advantage {w['difference']:+.3f} "
                  f"(paired patient-bootstrap 95% CI {w['ci95'][0]:+.3f} to {w['ci95'][1]:+.3f}, above zero)")
    else:
        chosen = inc
        best = max((r for r in comps if r["difference"] is not None), key=lambda r: r["difference"], default=None)
        reason = (f"pretrained incumbent; no challenger's AUC advantage is distinguishable from noise"
                  + (f" (largest: {best['challenger']} {best['difference']:+.3f}, 95% CI {best['ci95'][0]:+.3f} to "
                     f"{best['ci95'][1]:+.3f})" if best else ""))
    return {"chosen": chosen, "incumbent": inc["model_id"], "comparisons": comps, "reason": reason}


def select_defaults(root: str | Path, n_boot: int = 2000, write: bool = True) -> dict:
    """Choose (and unless write=False, write defaults.json) by the rule above, with each magnification's evidence."""
    root = Path(root)
    folders = list_model_folders(root)
    if not folders and not any(list_model_folders(root, task=t) for t in TASK_ENTRIES):
        raise FileNotFoundError(f"{root}: no model folders (<MAG or all>/<model>/card.json, idc/<model>/, "
                                "subtype/<model>/) to route")
    cards = [(f, ModelCard.from_json(f / "card.json")) for f in folders]
    out = {}
    for mag in MAGNIFICATIONS:
        cands = []
        for f, c in cards:
            s, kind, auc = c.summary_at(mag), _kind(c, mag), c.metric_at(mag)
            if auc is None or auc.value != auc.value:  # absent, or NaN (one class)
                continue
            cands.append({"model_id": c.model_id, "kind": kind, "auc": auc.value,
                          "auc_ci95": list(auc.ci95), "n_patients": s["n_patients"],
                          "pooled": c.magnification == ALL, "borrowed": c.magnification not in (ALL, mag),
                          "pretrained": is_pretrained(c), "tier": incumbent_tier(c) if c.magnification in (ALL, mag) else None,
                          "scores": frame_scores(f, c, mag), "card_sha256": file_sha256(f / "card.json"),
                          "weights_sha256": c.weights_sha256,
                          "member_weights": [m.get("weights_sha256") for m in (c.arch_config or {}).get("members") or []]
                          if c.architecture == "seed_ensemble" else []})
        if not cands:
            continue
        d = choose(cands, n_boot)
        best = d["chosen"]
        n = best["n_patients"]
        public = lambda c: {k: v for k, v in c.items() if k not in ("scores", "tier", "member_weights")}  # noqa: E731
        out[mag] = {**public(best), "few_patients": few_patients(n),
                    "rule": RULE, "incumbent": d["incumbent"], "comparisons": d["comparisons"],
                    "candidates": [public(c) for c in cands], "reason": d["reason"]}
    for task in TASK_ENTRIES:
        entry = task_entry(root, task)
        if entry:
            out[task] = entry
    if write:
        (root / DEFAULTS_FILE).write_text(json.dumps(out, indent=1) + "\n")
    return out


TASK_ENTRIES = ("idc", "subtype")  # tasks with one model each, routed under their own key


def task_entry(root: Path, task: str) -> dict | None:
    """The IDC patch model's or the subtype model's routing entry. With one model it serves; with several, the one
    already routed keeps serving (never the best of several on the folds it would be reported on), else the oldest."""
    folders = list_model_folders(root, task=task)
    if not folders:
        return None
    cards = [(f, ModelCard.from_json(f / "card.json")) for f in folders]
    try:
        current = (json.loads((root / DEFAULTS_FILE).read_text()).get(task) or {}).get("model_id")
    except (OSError, ValueError):
        current = None
    f, c = next(((f, c) for f, c in cards if c.model_id == current), min(cards, key=lambda fc: fc[1].created))
    what = "IDC patch model" if task == "idc" else "subtype model"
    reason = (f"the only {what}" if len(cards) == 1 else
              f"already routed; several {what}s: compare them on the same folds before switching" if c.model_id == current
              else f"the oldest of several {what}s (none was routed): compare them on the same folds before switching")
    # The paired rule, as for frames: a model that beat the routed one on identical patient folds by an AUC advantage
    # whose 95% CI lies above zero (recorded in its card by the command that compared them) displaces it.
    winners = [(f2, c2) for f2, c2 in cards if c2.model_id != c.model_id
               and (c2.evaluation.get("vs_routed") or {}).get("incumbent") == c.model_id
               and (c2.evaluation["vs_routed"].get("ci95") or [0])[0] > 0 and c2.evaluation["vs_routed"].get("same_folds")]
    if winners:
        f, c = max(winners, key=lambda fc: fc[1].evaluation["vs_routed"]["ci95"][0])
    v = c.evaluation.get("vs_routed") or {}
    if v.get("incumbent") in {c2.model_id for _, c2 in cards} and (v.get("ci95") or [0])[0] > 0:
        # the serving model won its place by the paired rule: say so each time routing is re-derived
        reason = (f"displaced {v['incumbent']}: AUC advantage {v['difference']:+.3f} (paired patient-bootstrap 95% CI "
                  f"{v['ci95'][0]:+.3f} to {v['ci95'][1]:+.3f}, above zero, on identical patient folds)")
    entry = {"model_id": c.model_id, "kind": what, "card_sha256": file_sha256(f / "card.json"), "reason": reason}
    if task == "idc":
        auc = c.metric_at(c.magnification)
        return {**entry, "auc": auc.value, "auc_ci95": list(auc.ci95), "n_patients": c.data["patients"]}
    ev = c.evaluation["subtype_cv"]
    ba = ev["results"][c.evaluation["strategy"]]["metrics"]["balanced_accuracy"]
    return {**entry, "balanced_accuracy": ba["value"], "balanced_accuracy_ci95": ba["ci95"],
            "strategy": c.evaluation["strategy"], "n_patients": c.data["patients"], "testable_classes": ev["testable"]}
