"""Keep a training run's out-of-fold evaluation in the repo (card.json + the predictions repeats-cv reads), without its
weights: build/ is git-ignored and does not outlive the machine, and a rule-1 repeat is 25-30 min of 2 cores.

    python scripts/archive_oof.py build/ensemble_s1/member_train10 ... --into benchmarks/results/oof_runs

Each run lands in <into>/s<split seed>_t<training seed>/ (card.json unchanged, so its sha256 still identifies the run;
predictions.csv reduced to the columns `python -m training repeats-cv --runs` reads, paths reduced to file names)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP = ["path", "patient", "label", "magnification", "cv_fold", "logit", "p_malignant"]


def archive_run(run: Path, into: Path) -> Path:
    """Copy one run's card and reduced out-of-fold predictions; refuses a run without out-of-fold folds."""
    from models.card import ModelCard

    card = ModelCard.from_json(run / "card.json")
    hp = card.hyperparameters
    if int(hp.get("cv_folds") or 0) < 2:
        raise ValueError(f"{run}: not a cross-validated run (cv_folds={hp.get('cv_folds')}): nothing out of fold")
    seed, train_seed = int(hp["seed"]), int(hp.get("train_seed", hp["seed"]))
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient": str})
    if pred["logit"].isna().any():
        raise ValueError(f"{run}: some frames have no out-of-fold logit")
    dest = into / f"s{seed}_t{train_seed}"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "card.json", dest / "card.json")
    pred = pred[KEEP].assign(path=pred["path"].map(lambda p: Path(p).name))
    pred.to_csv(dest / "predictions.csv", index=False, float_format="%.9g")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--into", type=Path, required=True)
    args = ap.parse_args(argv)
    for r in args.runs:
        print(f"{r} -> {archive_run(r, args.into)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
