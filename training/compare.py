"""Two runs of one recipe that differ in one thing (e.g. the initialisation), compared on identical patient folds:
the paired patient-bootstrap AUC difference of their out-of-fold logits, and whether the change is adopted by the
paired rule (the 95% CI of the advantage lies above zero)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.card import ModelCard
from models.metrics import paired_auc_difference


def _oof(folder: Path) -> pd.DataFrame:
    p = pd.read_csv(folder / "predictions.csv", dtype={"patient": str})
    p = p[p["logit"].notna()] if "logit" in p else p[p["p_malignant"].notna()]
    col = "logit" if "logit" in p else "p_malignant"  # raw logits: per-fold temperatures would distort the ranking
    return pd.DataFrame({"frame": p["path"].map(lambda s: Path(s).name), "patient": p["patient"],
                         "label": p["label"].astype(int), "score": p[col].astype(float), "fold": p["cv_fold"],
                         "magnification": p.get("magnification", "")})


def paired_runs(challenger: str | Path, incumbent: str | Path, n_boot: int = 2000, seed: int = 0,
                what: str = "") -> dict:
    """The challenger run's AUC advantage over the incumbent run on the same out-of-fold frames (pooled and per
    magnification), refusing runs whose folds differ."""
    a, b = Path(challenger), Path(incumbent)
    pa, pb = _oof(a), _oof(b)
    m = pa.merge(pb, on=["frame", "patient", "label"], suffixes=("_c", "_i"))
    same = (m.groupby("fold_c")["patient"].apply(frozenset).sort_values().tolist()
            == m.groupby("fold_i")["patient"].apply(frozenset).sort_values().tolist())
    if not same:
        raise ValueError(f"{a} and {b} were not cross-validated on the same patient folds: no paired comparison")

    def diff(d: pd.DataFrame) -> dict:
        return paired_auc_difference(d["label"].to_numpy(), d["score_c"].to_numpy(), d["score_i"].to_numpy(),
                                     d["patient"].to_numpy(), n_boot=n_boot, seed=seed)

    pooled = diff(m)
    per_mag = {str(k): diff(g) for k, g in m.groupby("magnification_c") if g["label"].nunique() == 2}
    ca, cb = ModelCard.from_json(a / "card.json"), ModelCard.from_json(b / "card.json")
    return {"what": what, "challenger": str(a), "incumbent": str(b),
            "challenger_init": ca.init.get("description") or ca.init.get("init"),
            "incumbent_init": cb.init.get("description") or cb.init.get("init"),
            "same_folds": bool(same), "n_frames": int(len(m)), "pooled": pooled, "per_magnification": per_mag,
            "adopted": bool(pooled["ci95"][0] > 0),
            "rule": "adopted only when the paired patient-bootstrap 95% CI of the AUC advantage lies above zero",
            "minutes": {"challenger": ca.training_time_s / 60, "incumbent": cb.training_time_s / 60}}


def write_paired_runs(challenger: str | Path, incumbent: str | Path, out: str | Path, what: str = "") -> dict:
    res = paired_runs(challenger, incumbent, what=what)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
                         + "\n")
    return res
