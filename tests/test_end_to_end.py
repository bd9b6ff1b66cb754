"""Official-layout archive -> index -> train a tiny model -> evaluate -> predict CLI agrees with evaluate."""
import csv
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from models.inference import load_model_folder
from tests.conftest import LITE2, ROOT, needs_shared
from training.engine import FitConfig
from training.evaluate import evaluate_model
from training.splits import assert_patient_disjoint
from training.train import run_train


@needs_shared
def test_archive_train_evaluate_predict(official_archive, tmp_path):
    out = tmp_path / "models" / "100X" / "tiny"
    cache = tmp_path / "cache"
    card = run_train(str(official_archive), "100X", "efficientnet_lite2", str(LITE2), out,
                     FitConfig(recipe="finetune", head_epochs=10, finetune_epochs=1, finetune_stages=1), cv=0,
                     n_boot=20, cache_dir=cache)
    for f in ("model.safetensors", "card.json", "split.csv", "predictions.csv", "curves.json"):
        assert (out / f).is_file()
    split = pd.read_csv(out / "split.csv", dtype={"patient": str})
    assert_patient_disjoint(split["patient"], split["part"])
    assert set(split["part"]) == {"train", "val", "test"}
    assert card.init["file_sha256"].startswith("4633c38a") and card.weights_sha256
    assert "auc" in card.evaluation["overall"]["metrics"] and card.baseline["overall"]

    res, held = evaluate_model(out, official_archive, n_boot=20, cache_dir=cache)
    test_patients = set(split.loc[split["part"] == "test", "patient"])
    assert set(held["patient"]) == test_patients
    assert res["n_patients"]["benign"] >= 1 and res["n_patients"]["malignant"] >= 1
    for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "precision", "f1",
                "patient_accuracy", "patient_score", "ece"):
        assert key in res["metrics"] and len(res["metrics"][key]["ci95"]) == 2
    # evaluate's probabilities equal the train-time test predictions ...
    pred = pd.read_csv(out / "predictions.csv").dropna(subset=["p_malignant"]).set_index("path")
    assert held.set_index("path")["p_malignant"].to_dict() == pytest.approx(pred["p_malignant"].to_dict(), abs=1e-6)

    # ... and the predict CLI gives the same probabilities for the same files.
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--model", str(out),
                        *held["path"]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = {x["path"]: float(x["p_malignant"]) for x in csv.DictReader(io.StringIO(r.stdout))}
    # batched vs single-image forwards differ only in float rounding (~1e-9)
    assert rows == pytest.approx(held.set_index("path")["p_malignant"].to_dict(), abs=1e-6)
    assert load_model_folder(out).card.model_id == "100X/tiny"


@needs_shared
def test_cross_validated_training_writes_out_of_fold_card(official_archive, tmp_path):
    out = tmp_path / "all" / "cv"
    card = run_train(str(official_archive), "all", "efficientnet_lite2", str(LITE2), out,
                     FitConfig(recipe="linear", head_epochs=10), cv=3, n_boot=20, cache_dir=tmp_path / "cache")
    folds = card.evaluation["per_fold"]
    assert len(folds) == 3 and "cross-validation" in card.evaluation["protocol"]
    tested = [p for f in folds for p in f["test_patients"]]
    assert len(tested) == len(set(tested)) == 6  # every patient tested exactly once, by a model that never saw it
    for f in folds:
        assert not set(f["test_patients"]) & set(f["val_patients"])
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    assert pred["p_malignant"].notna().all()
    assert_patient_disjoint(pred["patient"], pred["cv_fold"])
    assert card.recipe["final_model_schedule"]["temperature_source"].startswith("fitted on the pooled out-of-fold")
    assert set(card.per_magnification) == {"100X"}
    assert load_model_folder(out).card.weights_sha256 == card.weights_sha256
    from training.train import rescore

    again = rescore(out, n_boot=20)  # every figure is reproducible from predictions.csv
    assert again.evaluation["overall"]["metrics"] == card.evaluation["overall"]["metrics"]
    assert again.baseline["overall"]["metrics"]["auc"] == card.baseline["overall"]["metrics"]["auc"]

    # --cv-only (a rule-1 repeat): the same fold models' out-of-fold logits, no final model, nothing to load
    cv_only = tmp_path / "all" / "cv_only"
    c2 = run_train(str(official_archive), "all", "efficientnet_lite2", str(LITE2), cv_only,
                   FitConfig(recipe="linear", head_epochs=10), cv=3, n_boot=20, cache_dir=tmp_path / "cache",
                   refit_final=False)
    p2 = pd.read_csv(cv_only / "predictions.csv", dtype={"patient": str})
    assert p2["logit"].to_numpy() == pytest.approx(pred["logit"].to_numpy(), abs=1e-6)
    assert not (cv_only / "model.safetensors").exists() and c2.weights_sha256 == "" and c2.training_log == []
    assert c2.recipe["final_model_schedule"]["source"].startswith("none: --cv-only")
    with pytest.raises(FileNotFoundError, match="evaluation-only run"):
        load_model_folder(cv_only)


@pytest.mark.slow
@needs_shared
def test_train_seed_varies_training_on_fixed_folds(official_archive, tmp_path):
    """--train-seed (rule 1's training-seed repeats): same folds and inner splits as --seed, another network."""
    fc = FitConfig(recipe="finetune", head_epochs=3, finetune_epochs=1, finetune_stages=1, batch_size=4)
    runs = {}
    for ts in (None, 3):
        out = tmp_path / "all" / f"t{ts}"
        card = run_train(str(official_archive), "all", "efficientnet_lite2", str(LITE2), out, fc, cv=3, n_boot=20,
                         cache_dir=tmp_path / "cache", train_seed=ts, cross_magnification=False)
        runs[ts] = card, pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    (c0, p0), (c3, p3) = runs[None], runs[3]
    assert c0.hyperparameters["seed"] == c0.hyperparameters["train_seed"] == 0
    assert c3.hyperparameters["seed"] == 0 and c3.hyperparameters["train_seed"] == 3
    assert (p3["cv_fold"].to_numpy() == p0["cv_fold"].to_numpy()).all()
    assert [f["val_patients"] for f in c3.evaluation["per_fold"]] == [f["val_patients"] for f in c0.evaluation["per_fold"]]
    assert not np.allclose(p3["logit"], p0["logit"])
