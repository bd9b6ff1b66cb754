"""Routing that noise cannot fool: a pretrained incumbent serves unless a challenger's paired advantage is real."""
import json

import numpy as np
import pandas as pd
import pytest

from models.card import ModelCard
from models.metrics import paired_auc_difference, summarize
from tests.conftest import make_model_folder

PATS = np.repeat(np.arange(30), 6).astype(str)
Y = (np.arange(30).repeat(6) % 3 != 0).astype(int)  # 10 benign, 20 malignant patients


def _scores(signal: float, seed: int, base: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=len(Y)) if base is None else base
    return signal * Y + noise


def _folder(root, name: str, mag: str, scores: np.ndarray, pretrained: bool, recipe: str = "logreg", seed: int = 0):
    """A model folder whose out-of-fold predictions are `scores` (one per frame, same frames for every model)."""
    arch = "efficientnet_lite2" if pretrained else "resnet50"
    d = make_model_folder(root / mag / name, arch, mag, seed=seed)
    c = ModelCard.from_json(d / "card.json")
    if pretrained:
        c.init = {"init": "/weights/lite2.safetensors", "description": "ImageNet file", "file_sha256": "0" * 64}
    c.recipe = {"name": recipe}
    p = 1 / (1 + np.exp(-scores))
    c.evaluation["overall"] = summarize(Y, p, PATS, n_boot=20, score=scores)
    c.to_json(d / "card.json")
    pd.DataFrame({"path": [f"/data/{mag}/f{i}.jpg" for i in range(len(Y))], "patient": PATS, "label": Y,
                  "magnification": mag, "cv_fold": np.arange(30).repeat(6) % 5, "logit": scores,
                  "p_malignant": p}).to_csv(d / "predictions.csv", index=False)
    return d


def test_paired_difference_is_zero_for_identical_models_and_positive_for_a_clearly_better_one():
    a = _scores(0.5, 1)
    same = paired_auc_difference(Y, a, a, PATS, n_boot=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    better = paired_auc_difference(Y, _scores(3.0, 1), a, PATS, n_boot=200)
    assert better["difference"] > 0.2 and better["ci95"][0] > 0
    assert better["n_patients"] == {"benign": 10, "malignant": 20}


def test_a_noisy_advantage_does_not_displace_the_pretrained_incumbent(tmp_path):
    from models.routing.rule import select_defaults

    inc = _scores(0.6, 1)
    _folder(tmp_path, "lite2_logreg", "100X", inc, pretrained=True, seed=1)
    # A from-scratch challenger ~0.05 AUC ahead on these frames: the size of difference that is noise on 30 patients.
    noisy = inc + np.random.default_rng(0).normal(scale=0.8, size=len(Y)) + 0.3 * Y
    _folder(tmp_path, "resnet_scratch", "100X", noisy, pretrained=False, recipe="full", seed=2)
    d = select_defaults(tmp_path, n_boot=500)["100X"]
    comp = {r["challenger"]: r for r in d["comparisons"]}["100X/resnet_scratch"]
    assert comp["difference"] > 0.03, "the challenger must lead on the point estimate for this test to mean anything"
    assert comp["ci95"][0] <= 0 and not comp["displaces"] and comp["same_folds"]
    assert d["model_id"] == "100X/lite2_logreg" and d["incumbent"] == "100X/lite2_logreg"
    assert "incumbent" in d["reason"]
    written = json.loads((tmp_path / "defaults.json").read_text())["100X"]
    assert written["model_id"] == "100X/lite2_logreg" and written["comparisons"][0]["ci95"] == comp["ci95"]
    assert len(written["card_sha256"]) == 64


def test_a_clear_advantage_displaces_the_incumbent_and_the_app_says_why(tmp_path):
    from app.dashboard import routing_evidence
    from models.routing import resolve
    from models.routing.rule import select_defaults

    _folder(tmp_path, "lite2_logreg", "100X", _scores(0.3, 1), pretrained=True, seed=1)
    _folder(tmp_path, "resnet_scratch", "100X", _scores(3.0, 1), pretrained=False, recipe="full", seed=2)
    d = select_defaults(tmp_path, n_boot=500)["100X"]
    assert d["model_id"] == "100X/resnet_scratch" and "displaced" in d["reason"]
    notes = " ".join(resolve("malignancy", "100X", tmp_path).notes)
    assert "displaced the pretrained incumbent" in notes
    ev = routing_evidence("100X", tmp_path)
    assert ev.loc[0, "displaces"] and ev.loc[0, "challenger"] == "100X/resnet_scratch"
    # A card edited after routing is flagged.
    c = ModelCard.from_json(tmp_path / "100X" / "resnet_scratch" / "card.json")
    c.threshold = 0.4
    c.to_json(tmp_path / "100X" / "resnet_scratch" / "card.json")
    assert "changed after routing" in " ".join(resolve("malignancy", "100X", tmp_path).notes)


def test_reference_recipe_is_preferred_as_incumbent_over_the_frozen_one(tmp_path):
    from models.routing.rule import incumbent_tier, select_defaults

    ref = _folder(tmp_path, "lite2_full", "100X", _scores(0.5, 3), pretrained=True, recipe="full", seed=1)
    c = ModelCard.from_json(ref / "card.json")
    c.hyperparameters = {"colour_augmentation": "hed"}
    c.to_json(ref / "card.json")
    frozen = _folder(tmp_path, "lite2_logreg", "100X", _scores(0.55, 4), pretrained=True, seed=2)
    assert incumbent_tier(c) == 0 and incumbent_tier(ModelCard.from_json(frozen / "card.json")) == 1
    d = select_defaults(tmp_path, n_boot=300)["100X"]
    assert d["incumbent"] == "100X/lite2_full" and d["model_id"] == "100X/lite2_full"


def test_a_member_of_the_incumbent_seed_ensemble_never_displaces_it(tmp_path):
    """Issue 25: the ensemble of the reference recipe is the incumbent; one of its own runs, however lucky on these
    frames, is not a challenger (routing it would be picking the best seed)."""
    from models.routing.rule import incumbent_tier, select_defaults

    lucky = _folder(tmp_path, "lite2_full", "100X", _scores(3.0, 5), pretrained=True, recipe="full", seed=1)
    c = ModelCard.from_json(lucky / "card.json")
    c.hyperparameters = {"colour_augmentation": "hed"}
    c.to_json(lucky / "card.json")
    ens = _folder(tmp_path, "lite2_ensemble", "100X", _scores(0.4, 6), pretrained=True, recipe="full", seed=2)
    e = ModelCard.from_json(ens / "card.json")
    e.architecture = "seed_ensemble"
    e.hyperparameters = {"colour_augmentation": "hed"}
    e.arch_config = {"member_arch": "efficientnet_lite2",
                     "members": [{"weights_file": "m0.safetensors", "weights_sha256": c.weights_sha256}]}
    e.to_json(ens / "card.json")
    assert incumbent_tier(e) == -1 < incumbent_tier(c)
    d = select_defaults(tmp_path, n_boot=300)["100X"]
    assert d["model_id"] == "100X/lite2_ensemble" and d["incumbent"] == "100X/lite2_ensemble"
    comp = {r["challenger"]: r for r in d["comparisons"]}["100X/lite2_full"]
    assert not comp["displaces"] and "member" in comp["note"]


@pytest.mark.parametrize("bound_logits", [np.array([5.0, -5.0, 4.0, -4.0]), np.array([0.01, -0.01, 0.02, -0.02])])
def test_temperature_guard_falls_back_when_the_fit_lands_on_a_bound(bound_logits):
    from models.metrics import TEMPERATURE_FALLBACK, fit_temperature_guarded

    t, note = fit_temperature_guarded(bound_logits, np.array([0, 1, 0, 1]))  # every frame ranked wrongly / no signal
    assert t == TEMPERATURE_FALLBACK and "bound" in note
    t, note = fit_temperature_guarded(np.array([3.0, -3.0, 1.0, -2.0, 0.5]), np.array([1, 0, 0, 0, 1]))
    assert note == "fitted" and 0.05 < t < 20


def test_source_table_and_worst_frames_come_from_the_out_of_fold_predictions():
    from app.dashboard import source_and_worst

    pred = pd.DataFrame({"path": [f"/d/f{i}.jpg" for i in range(6)], "patient": list("aabbcc"), "label": [0, 0, 1, 1, 1, 1],
                         "magnification": "100X", "source": ["r1@x:p"] * 3 + ["r2@y:q"] * 3,
                         "p_malignant": [0.1, 0.9, 0.8, 0.2, 0.7, 0.6]})
    by_source, worst = source_and_worst(pred, n_worst=2)
    assert set(by_source["source repository"]) == {"r1", "r2"} and by_source["frames"].sum() == 6
    assert list(worst["frame"]) == ["f1.jpg", "f3.jpg"]  # p 0.9 for a benign frame, 0.2 for a malignant one
