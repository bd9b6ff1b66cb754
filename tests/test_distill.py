"""Feature distillation of a ResNet-50 from the frozen Lite2 (issue 18, item 6): the machinery, on tiny data."""
import numpy as np
import pandas as pd
import torch

from training.distill import distill, save_student, student_tile_means
from training.frozen_cv import feature_sets_cv


def test_distilled_student_is_saved_in_torchvision_keys_and_loads_as_resnet50_init(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (12, 3, 64, 66), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8, generator=g)
    ta, tb = np.random.default_rng(0).normal(size=(12, 1280)), np.random.default_rng(1).normal(size=(8, 1280))
    m, rec = distill([(a, ta), (b, tb)], minutes=0.05, batch=4)
    assert rec["steps"] > 0 and rec["images_seen"] > 0 and rec["loss_by_quarter"]
    out = tmp_path / "student.safetensors"
    save_student(m, out, rec)
    assert (tmp_path / "student.json").is_file()
    from models.archs import build_model

    model, init = build_model("resnet50", str(out))  # --init FILE: the card names the file and its sha256
    assert init["file_sha256"] and "student.safetensors" in init["description"]
    sd = m.state_dict()
    np.testing.assert_allclose(model.backbone[0].weight.detach().numpy(), sd["conv1.weight"].numpy())
    f = student_tile_means(m, a, 2)  # 12 tiles = 2 frames x 6
    assert f.shape == (2, 2048)


def _patients(n_pat: int = 20, per: int = 6) -> tuple[pd.DataFrame, np.ndarray]:
    """Alternating benign/malignant patients with `per` frames each, and the frames' labels."""
    y = np.repeat(np.arange(n_pat) % 2, per)
    return pd.DataFrame({"patient": np.repeat(np.arange(n_pat), per).astype(str),
                         "label": np.where(y == 1, "malignant", "benign"), "magnification": "100X"}), y


def test_feature_sets_cv_compares_sets_on_the_same_patient_folds():
    rng = np.random.default_rng(0)
    df, y = _patients()
    good = rng.normal(size=(len(y), 8)) + 1.5 * y[:, None]
    noise = rng.normal(size=(len(y), 8))
    res = feature_sets_cv(df, {"ref": noise, "good": good}, "ref", split_seeds=(0,), k=4, n_boot=50)
    assert res["sets"]["ref"]["vs_reference"] is None
    d = res["sets"]["good"]["vs_reference"]
    assert d["difference"] > 0.2 and d["ci95"][0] > 0


def test_repeated_cv_reports_rule_one_figures_against_whole_frame_lr():
    from training.frozen_cv import repeated_cv

    rng = np.random.default_rng(1)
    df, y = _patients()
    whole = rng.normal(size=(len(y), 8))
    tiles = rng.normal(size=(len(y), 6, 8)) + 1.0 * y[:, None, None]
    res = repeated_cv(df, whole, tiles, ("whole_lr", "tiles_mean_lr"), (0, 1), k=4, n_boot=50)
    r = res["recipes"]["tiles_mean_lr"]
    assert len(r["pooled_auc_by_seed"]) == 2 and r["vs_whole_lr"]["difference"] > 0
    assert res["recipes"]["whole_lr"]["vs_whole_lr"] is None and "vs_reference" not in r


def test_trained_runs_are_read_back_on_frozen_cv_folds_and_compared(tmp_path):
    """Rule 1 for a trained recipe: runs with different --seed, their folds checked against frozen-cv's, compared
    with the frozen recipes on identical folds; runs of different recipes or on other folds are refused."""
    import pytest

    from models.card import ModelCard
    from tests.conftest import make_model_folder
    from training.frozen_cv import trained_runs_cv
    from training.splits import grouped_kfold

    rng = np.random.default_rng(2)
    df, y = _patients()
    df["path"] = [f"/data/f{i}.png" for i in range(len(df))]
    whole, tiles = rng.normal(size=(len(y), 8)), rng.normal(size=(len(y), 6, 8))
    runs = []
    for seed, train_seed in ((0, None), (1, None), (2, None), (0, 5)):  # the last: another training seed, seed 0's folds
        f = make_model_folder(tmp_path / "all" / f"run{seed}_{train_seed}", "efficientnet_lite2", "all", seed=seed)
        c = ModelCard.from_json(f / "card.json")
        c.hyperparameters = {"lr": 2e-4, "seed": seed, "eval_tta": seed == 0,  # TTA scoring is evaluation only
                             **({"train_seed": train_seed} if train_seed is not None else {})}
        c.evaluation["per_fold"] = [{"auc": 0.8, "temperature_fit": "fitted"}] * 4
        c.to_json(f / "card.json")
        pd.DataFrame({"path": [f"/elsewhere/f{i}.png" for i in range(len(df))],  # matched by file name
                      "cv_fold": grouped_kfold(df, 4, seed).to_numpy(),
                      # the extra training seed's run is made anti-informative: it must not leak into the summary
                      "logit": (-2.0 if train_seed else 2.0) * y + rng.normal(0, 1, len(y))}).to_csv(
            f / "predictions.csv", index=False)
        runs.append(f)
    res = trained_runs_cv(df, runs, whole, tiles, n_boot=50, k=4)
    r = res["recipe"]
    assert res["seeds"] == [0, 1, 2] and len(r["pooled_auc_by_seed"]) == 3 and len(res["training_minutes_per_run"]) == 4
    assert res["run_seeds"] == [[0, 0], [1, 1], [2, 2], [0, 5]]
    spread = res["training_seed_spread"]
    assert list(spread) == ["0"] and spread["0"]["train_seeds"] == [0, 5] and len(spread["0"]["pooled_auc"]) == 2
    # one run per split seed in the summary (as every recipe has); the other training seed only in the spread
    assert r["pooled_auc_by_seed"][0] == spread["0"]["pooled_auc"][0] > 0.8 and spread["0"]["pooled_auc"][1] < 0.2
    assert res["folds_with_temperature_fallback"] == "0/12"
    # against an incumbent recipe's runs on the same split seeds: paired on identical folds (itself: exactly zero)
    same = trained_runs_cv(df, runs, whole, tiles, n_boot=20, k=4, incumbent=runs[:3])["recipe"]["vs_incumbent"]
    assert same["difference"] == 0 and same["incumbent"] == res["model_id"]
    with pytest.raises(ValueError, match="not the same folds"):
        trained_runs_cv(df, runs, whole, tiles, n_boot=20, k=4, incumbent=runs[:2])
    assert r["vs_whole_lr"]["difference"] > 0.2 and r["vs_whole_lr"]["ci95"][0] > 0  # signal vs noise features
    assert set(res["references"]) == {"whole_lr", "tiles_mean_lr"} and "vs_tiles_mean_lr" in r
    c = ModelCard.from_json(runs[3] / "card.json")
    c.hyperparameters["train_seed"] = 0  # now a second run of (0, 0)
    c.to_json(runs[3] / "card.json")
    with pytest.raises(ValueError, match="repeated"):
        trained_runs_cv(df, runs, whole, tiles, n_boot=20, k=4)
    runs = runs[:3]
    pd.read_csv(runs[2] / "predictions.csv").assign(cv_fold=grouped_kfold(df, 4, 7).to_numpy()).to_csv(
        runs[2] / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="not frozen-cv's folds"):
        trained_runs_cv(df, runs, whole, tiles, n_boot=20, k=4)
    c = ModelCard.from_json(runs[1] / "card.json")
    c.hyperparameters["lr"] = 1e-3
    c.to_json(runs[1] / "card.json")
    with pytest.raises(ValueError, match="more than --seed/--train-seed"):
        trained_runs_cv(df, runs, whole, tiles, n_boot=20, k=4)


def test_a_seed_ensemble_is_read_over_split_seeds_as_the_mean_of_its_members(tmp_path):
    """Issue 25's rule 1 for the seed ensemble: on each split seed, every run of that seed is a member and the
    ensemble's logit is their mean; the summary is over split seeds; unequal member counts are refused."""
    import pytest

    from models.card import ModelCard
    from models.metrics import _safe_auc
    from tests.conftest import make_model_folder
    from training.frozen_cv import trained_runs_cv
    from training.splits import grouped_kfold

    rng = np.random.default_rng(3)
    df, y = _patients()
    df["path"] = [f"/data/f{i}.png" for i in range(len(df))]
    whole, tiles = rng.normal(size=(len(y), 8)), rng.normal(size=(len(y), 6, 8))
    runs, logits = [], {}
    for seed, train_seed in ((0, None), (0, 10), (1, None), (1, 10)):
        f = make_model_folder(tmp_path / "all" / f"run{seed}_{train_seed}", "efficientnet_lite2", "all", seed=seed)
        c = ModelCard.from_json(f / "card.json")
        c.hyperparameters = {"lr": 2e-4, "seed": seed, **({"train_seed": train_seed} if train_seed is not None else {})}
        c.evaluation["per_fold"] = [{"auc": 0.5, "temperature_fit": "fitted"}] * 3 + [
            {"auc": 0.5, "temperature_fit": "fallback T=1" if (seed, train_seed) == (1, 10) else "fitted"}]
        c.to_json(f / "card.json")
        z = 1.0 * y + rng.normal(0, 1, len(y))
        logits[(seed, train_seed)] = z
        pd.DataFrame({"path": df["path"], "cv_fold": grouped_kfold(df, 4, seed).to_numpy(), "logit": z}).to_csv(
            f / "predictions.csv", index=False)
        runs.append(f)
    res = trained_runs_cv(df, runs, whole, tiles, n_boot=30, k=4, seed_ensemble=True)
    for n, seed in enumerate((0, 1)):
        mean = (logits[(seed, None)] + logits[(seed, 10)]) / 2
        assert res["recipe"]["pooled_auc_by_seed"][n] == pytest.approx(_safe_auc(y, mean))
    assert "seed ensemble of 2 training seeds" in res["protocol"] and res["seeds"] == [0, 1]
    # the ensemble's logits come from every member: a non-primary member's fallback counts (4 runs x 4 folds)
    assert res["seed_ensemble"] and res["folds_with_temperature_fallback"] == "1/16 member folds"
    single = trained_runs_cv(df, runs, whole, tiles, n_boot=30, k=4)  # the single runs: training seed = split seed
    assert single["recipe"]["pooled_auc_by_seed"][0] == pytest.approx(_safe_auc(y, logits[(0, None)]))
    vs = trained_runs_cv(df, runs, whole, tiles, n_boot=30, k=4, incumbent=[runs[0], runs[2]],
                         seed_ensemble=True)["recipe"]["vs_incumbent"]  # the ensemble beside its single runs
    assert vs["difference"] != 0 and vs["n_images"] == len(y)
    with pytest.raises(ValueError, match="same number"):
        trained_runs_cv(df, runs[:3], whole, tiles, n_boot=20, k=4, seed_ensemble=True)


def test_an_archived_run_is_read_back_by_repeats_cv_as_the_run_itself(tmp_path):
    """scripts/archive_oof.py keeps a run's out-of-fold evaluation without weights (build/ does not outlive the
    machine): repeats-cv reads the archive to the same figures, and a run that is not out of fold is refused."""
    import pytest

    from models.card import ModelCard
    from scripts.archive_oof import archive_run
    from tests.conftest import make_model_folder
    from training.frozen_cv import trained_runs_cv
    from training.splits import grouped_kfold

    rng = np.random.default_rng(5)
    df, y = _patients()
    df["path"] = [f"/data/sub/f{i}.png" for i in range(len(df))]
    whole, tiles = rng.normal(size=(len(y), 8)), rng.normal(size=(len(y), 6, 8))
    runs, archived = [], []
    for seed in (0, 1):
        f = make_model_folder(tmp_path / "all" / f"run{seed}", "efficientnet_lite2", "all", seed=seed)
        c = ModelCard.from_json(f / "card.json")
        c.hyperparameters = {"lr": 2e-4, "seed": seed, "cv_folds": 4}
        c.evaluation["per_fold"] = [{"auc": 0.5, "temperature_fit": "fitted"}] * 4
        c.to_json(f / "card.json")
        pd.DataFrame({"path": df["path"], "patient": df["patient"], "label": y, "magnification": "100X",
                      "cv_fold": grouped_kfold(df, 4, seed).to_numpy(), "logit": 1.0 * y + rng.normal(0, 1, len(y)),
                      "p_malignant": 0.5, "blur_variance": 1.0}).to_csv(f / "predictions.csv", index=False)
        runs.append(f)
        archived.append(archive_run(f, tmp_path / "archive"))
    assert [a.name for a in archived] == ["s0_t0", "s1_t1"] and not list(archived[0].glob("*.safetensors"))
    assert "blur_variance" not in pd.read_csv(archived[0] / "predictions.csv").columns
    a = trained_runs_cv(df, archived, whole, tiles, n_boot=30, k=4)
    b = trained_runs_cv(df, runs, whole, tiles, n_boot=30, k=4)
    assert a["recipe"]["pooled_auc_by_seed"] == pytest.approx(b["recipe"]["pooled_auc_by_seed"])
    c = ModelCard.from_json(runs[0] / "card.json")
    c.hyperparameters["cv_folds"] = 0
    c.to_json(runs[0] / "card.json")
    with pytest.raises(ValueError, match="not a cross-validated run"):
        archive_run(runs[0], tmp_path / "again")
