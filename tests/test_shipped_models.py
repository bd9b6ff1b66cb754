"""What magnif_models/ ships: verified weights, complete cards, patient-wise splits, validation-chosen defaults."""
import json

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from models.card import ModelCard
from models.config import models_root
from models.folders import list_model_folders
from models.inference import MAGNIFICATIONS, load_model_folder
from training.splits import assert_patient_disjoint
from tests.conftest import ROOT

FOLDERS = list_model_folders(ROOT / "magnif_models")
METRICS = ["accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "precision", "f1",
           "patient_accuracy", "patient_score", "ece"]


def test_models_are_shipped_within_budget():
    """Issue 25's budget: everything in magnif_models/ under 250 MB (the seed ensemble's members in fp16)."""
    assert FOLDERS, "magnif_models/ holds no model"
    size = sum(p.stat().st_size for p in (ROOT / "magnif_models").rglob("*") if p.is_file())
    assert size < 250 * 2**20, f"magnif_models/ is {size / 2**20:.1f} MB"


def test_every_shipped_candidate_is_re_evaluated_under_rule_1():
    """Issue 18, rule 1: each shipped malignancy model's recipe has 3 split seeds x 5 folds on record (its own
    re-runs, or the frozen-cv recipe it is; fewer only with a declared reason), with CIs and patient counts; the
    frozen models' seed-0 run is the card's."""
    from app.dashboard import rule1_summary

    for folder in FOLDERS:
        card = ModelCard.from_json(folder / "card.json")
        if card.task_kind != "malignancy":
            continue
        r = rule1_summary(card.model_id, ROOT / "benchmarks" / "results")
        assert r is not None, f"{card.model_id}: no repeated-CV figure (rule 1)"
        # 3 split seeds, or fewer only where the shortfall is declared (and shown with the figure): the seed ensemble
        # (issue 25) has one split seed of 3 training runs, and says so
        assert r["split_seeds"] == 3 or (r["shortfall"] and f"{r['split_seeds']} of 3 split seeds" in r["shortfall"]), \
            (card.model_id, r["split_seeds"])
        assert r["auc"].ci95[0] < r["auc"].value < r["auc"].ci95[1]
        assert r["n_patients"] == card.overall["n_patients"]
        if card.recipe.get("name") == "logreg":  # the frozen-cv whole-frame LR is this very model
            assert r["pooled_auc_by_seed"][0] == pytest.approx(card.overall["metrics"]["auc"]["value"], abs=0.005)


def test_hybrid_is_shipped_with_its_phases_and_tta_figures():
    card = ModelCard.from_json(ROOT / "magnif_models" / "all" / "hybrid" / "card.json")
    assert card.architecture == "hybrid" and card.recipe["phases_per_fold"]
    assert "auc" in card.evaluation["tta"]["overall"]["metrics"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f"{f.parent.name}/{f.name}")
def test_card_is_complete_and_weights_verify(folder):
    lm = load_model_folder(folder)  # raises on sha256 mismatch
    c = lm.card
    assert c.init["description"] and c.init["init"]
    ov = c.evaluation["overall"]
    for m in METRICS:
        lo, hi = ov["metrics"][m]["ci95"]
        assert 0 <= lo <= hi <= 1, (m, ov["metrics"][m])
    assert ov["n_patients"]["benign"] >= 2 and ov["n_patients"]["malignant"] >= 2
    assert c.baseline["overall"]["metrics"]["auc"]["value"] > 0
    assert c.data["all"]["benign"]["patients"] > 0 and c.training_time_s > 0 and c.git_commit
    assert "cross-validation" in c.evaluation["protocol"]
    if c.hyperparameters.get("eval_tta", True):  # models trained with --tta-eval were scored with 8 views too
        tta = c.evaluation["tta"]["overall"]["metrics"]["auc"]
        assert 0 <= tta["ci95"][0] <= tta["value"] <= tta["ci95"][1] <= 1
    if c.magnification == "all":
        assert set(c.per_magnification) == set(MAGNIFICATIONS)
    split = pd.read_csv(folder / "split.csv", dtype={"patient": str})
    assert_patient_disjoint(split["patient"], split["part"])
    assert_patient_disjoint(split["patient"], split["cv_fold"])
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient": str})
    assert pred["p_malignant"].notna().all()  # every frame has an out-of-fold prediction
    assert (folder / "curves.json").is_file()


def test_shipped_defaults_are_re_derived_from_the_cards_by_the_routing_rule():
    """defaults.json is what the rule gives on the shipped cards today (not checked against its own list)."""
    from models.routing.rule import select_defaults

    shipped = json.loads((ROOT / "magnif_models" / "defaults.json").read_text())
    assert set(shipped) == set(MAGNIFICATIONS) | {"idc", "subtype"}
    again = select_defaults(ROOT / "magnif_models", write=False)
    for task in ("idc", "subtype"):
        e = shipped.pop(task)
        assert again[task]["model_id"] == e["model_id"] and again[task]["card_sha256"] == e["card_sha256"], task
    assert again["subtype"]["balanced_accuracy"] < 0.4  # the weak subtype model is routed with its weak figure
    for mag, entry in shipped.items():
        assert again[mag]["model_id"] == entry["model_id"], mag
        assert again[mag]["card_sha256"] == entry["card_sha256"], f"{mag}: card changed after routing"
        card = ModelCard.from_json(ROOT / "magnif_models" / entry["model_id"] / "card.json")
        assert entry["pooled"] == (card.magnification == "all")
        if entry["model_id"] != entry["incumbent"]:  # a challenger serves only with a CI above zero
            win = next(r for r in entry["comparisons"] if r["challenger"] == entry["model_id"])
            assert win["ci95"][0] > 0


def test_metrics_page_renders_every_shipped_model(monkeypatch):
    monkeypatch.delenv("BREAKHIS_MODELS_DIR", raising=False)
    monkeypatch.chdir(ROOT)
    assert models_root() == ROOT / "magnif_models"
    at = AppTest.from_file(str(ROOT / "pages" / "2_Model_metrics.py"), default_timeout=120)
    at.run()
    seen = set()
    for mag in ["all", *MAGNIFICATIONS]:
        at.selectbox(key="metrics_mag").set_value(mag).run()
        for label in at.selectbox(key="metrics_model").options:
            mid = label.split(" (in use at ")[0]  # the model in use is listed first, marked
            at.selectbox(key="metrics_model").set_value(mid).run()
            assert not at.exception, (mag, mid, at.exception)
            seen.add(mid)
    assert seen == {f"{f.parent.name}/{f.name}" for f in FOLDERS}


def test_the_routed_malignancy_model_is_the_seed_ensemble_with_its_case_policy():
    """Issue 25: the routed model is the seed ensemble (every member listed with its sha256, no selection), calibrated
    per magnification where it has >= 5 patients per class, with a case policy validated on held-out patients."""
    import json

    from models.case import CasePolicy
    from models.inference import load_model_folder
    from models.routing import read_defaults

    d = read_defaults(ROOT / "magnif_models")
    routed = {d[m]["model_id"] for m in ("40X", "100X", "200X", "400X")}
    assert routed == {"all/efficientnet_lite2_ensemble"}
    folder = ROOT / "magnif_models" / "all" / "efficientnet_lite2_ensemble"
    card = ModelCard.from_json(folder / "card.json")
    members = card.arch_config["members"]
    assert card.architecture == "seed_ensemble" and len(members) >= 3
    assert len({m["train_seed"] for m in members}) == len(members)
    for g, t in card.temperature_by_magnification.items():
        assert min(t.n_patients.values()) >= 5, g
    assert "200X" not in card.temperature_by_magnification  # 4 benign / 6 malignant patients: the pooled value
    lm = load_model_folder(folder)
    assert lm.policy is not None and lm.case_policy is not None, lm.policy_note
    nested = json.loads((folder / "refer.json").read_text())["case_policy"]["nested"]["by_size"]
    six = nested["6"]["case_policy"]
    assert six["n_patients"]["benign"] >= 3 and six["coverage"]["ci95"][0] <= six["coverage"]["value"]
    assert isinstance(lm.case_policy, CasePolicy)
