"""Subtypes (issue 17, first part): flat and hierarchical heads, patient-grouped folds, honest class reporting."""
import numpy as np
import pandas as pd
import pytest

from training.subtypes import (BENIGN_SUBTYPES, SUBTYPES, fit_subtype_model, markdown_tables, out_of_fold,
                               subtype_calls, subtype_codes, subtype_cv, subtype_metrics)


def _synthetic(n_pat_per_class=(3, 3, 2, 3, 5, 3, 3, 3), frames=6, signal=1.0, patient_noise=3.0, seed=0):
    """Frames whose features carry a class signal plus a strong per-patient offset (as a slide's staining does)."""
    rng = np.random.default_rng(seed)
    rows, x = [], []
    centres = rng.normal(0, 1, (len(SUBTYPES), 16))
    pid = 0
    for c, n in enumerate(n_pat_per_class):
        for _ in range(n):
            off = rng.normal(0, patient_noise, 16)
            for _ in range(frames):
                x.append(signal * centres[c] + off + rng.normal(0, 0.3, 16))
                rows.append({"patient": f"p{pid}", "subtype": SUBTYPES[c],
                             "label": "benign" if SUBTYPES[c] in BENIGN_SUBTYPES else "malignant",
                             "magnification": "100X"})
            pid += 1
    return pd.DataFrame(rows), np.array(x)


def test_hierarchical_subtype_always_agrees_with_its_binary_call():
    df, x = _synthetic(signal=0.5)
    codes = subtype_codes(df)
    prob = fit_subtype_model(x, codes, df["patient"].to_numpy(), "hierarchical")(x + 0.5)
    np.testing.assert_allclose(prob.sum(1), 1, atol=1e-9)
    nb = len(BENIGN_SUBTYPES)
    p_malignant = prob[:, nb:].sum(1)
    assert ((subtype_calls(prob, True) >= nb) == (p_malignant >= 0.5)).all()  # the subtype agrees with the binary call
    split = np.array([[0.45, 0, 0, 0, 0.14, 0.14, 0.14, 0.13]])  # malignant by its parent, benign by the bare argmax
    assert subtype_calls(split, True)[0] >= nb and subtype_calls(split, False)[0] == 0
    flat = fit_subtype_model(x, codes, df["patient"].to_numpy(), "flat")(x)
    np.testing.assert_allclose(flat.sum(1), 1, atol=1e-9)


def test_unknown_subtype_is_refused():
    df, _ = _synthetic()
    df.loc[0, "subtype"] = "sarcoma"
    with pytest.raises(ValueError, match="unknown subtype"):
        subtype_codes(df)


def test_image_wise_split_inflates_scores_when_patients_differ():
    """The leakage the issue asks to show: with patient-specific features, frames of a seen patient are easy."""
    df, x = _synthetic(signal=0.3, patient_noise=4.0)
    codes, pats = subtype_codes(df), df["patient"].to_numpy()
    grouped = out_of_fold(x, codes, pats, "flat", (0,), 3)
    leaky = out_of_fold(x, codes, pats, "flat", (0,), 3, leakage=True)
    acc = lambda p: (p.argmax(1) == codes).mean()  # noqa: E731
    assert acc(leaky) > acc(grouped) + 0.3


def test_classes_with_too_few_patients_are_reported_not_averaged():
    df, x = _synthetic()
    res = subtype_cv(df, x, split_seeds=(0,), k=3, n_boot=20)
    assert SUBTYPES[2] in res["not_testable"] and SUBTYPES[2] not in res["testable"]  # 2 patients
    grouped = res["results"]["flat"]["metrics"]
    assert grouped["recall/" + SUBTYPES[2]]["value"] is not None  # shown ...
    codes = subtype_codes(df)
    prob = np.eye(len(SUBTYPES))[codes]
    prob[codes == 2] = np.eye(len(SUBTYPES))[0]  # ... but a wholly wrong untestable class leaves the macro scores at 1
    m = subtype_metrics(codes, prob, df["patient"].to_numpy(), [c for c in range(8) if c != 2])
    assert m["balanced_accuracy"] == 1.0 and m["recall/" + SUBTYPES[2]] == 0.0
    assert "leakage" in markdown_tables(res) and "too few patients to test" in markdown_tables(res)
    lo, hi = grouped["balanced_accuracy"]["ci95"]
    assert lo <= grouped["balanced_accuracy"]["value"] <= hi


@pytest.mark.parametrize("strategy", ["flat", "hierarchical"])
def test_the_shipped_head_computes_what_the_fitted_heads_computed(strategy):
    """The numpy heads (standardisation folded in) copied into the torch SubtypeHead give the same probabilities."""
    import torch

    from models.subtype import SubtypeHead

    df, x = _synthetic(signal=1.0)
    heads = fit_subtype_model(x, subtype_codes(df), df["patient"].to_numpy(), strategy)
    head = SubtypeHead(x.shape[1], strategy)
    heads.load_into(head)
    with torch.no_grad():
        p_torch = torch.exp(head(torch.from_numpy(x).float())).double().numpy()
    assert np.allclose(p_torch, heads(x), atol=1e-4) and np.allclose(p_torch.sum(1), 1.0, atol=1e-5)
    missing = fit_subtype_model(x[df["subtype"] != "adenosis"], subtype_codes(df)[df["subtype"] != "adenosis"],
                                df["patient"].to_numpy()[df["subtype"] != "adenosis"], strategy)
    assert np.allclose(missing(x)[:, 0], 0.0)  # a class the fold never saw gets probability 0, not a guess
    with pytest.raises(ValueError, match="never saw"):
        missing.load_into(SubtypeHead(x.shape[1], strategy))  # and such heads cannot be shipped


def test_the_subtype_shown_always_agrees_with_the_routed_call():
    from models.subtype import call_subtype, subtype_given_binary

    rng = np.random.default_rng(1)
    for _ in range(200):
        p = rng.dirichlet(np.ones(8))
        pm = float(rng.random())
        q = subtype_given_binary(p, pm)
        assert np.isclose(q.sum(), 1.0) and np.isclose(q[4:].sum(), pm)
        c = call_subtype(q, pm >= 0.5)
        assert (SUBTYPES.index(c.subtype) >= 4) == (pm >= 0.5)
        assert len(c.top3) == 3 and c.top3[0][1] >= c.top3[1][1] >= c.top3[2][1]
    # the subtype model's own parent says benign with certainty; the routed model says malignant: the call follows
    # the routed model, within the malignant subtypes
    c = call_subtype(subtype_given_binary(np.r_[0.97, 0.01, 0.01, 0.0, 0.0, 0.0, 0.01, 0.0], 0.9), True)
    assert c.subtype == "mucinous_carcinoma" and np.isclose(c.p_subtype, 0.9)


def test_routed_parent_variant_is_measured_and_reported():
    df, x = _synthetic(signal=1.0)
    codes = subtype_codes(df)
    parent = ("all/some_model", (codes >= 4).astype(float) * 0.8 + 0.1)
    res = subtype_cv(df, x, strategies=("hierarchical",), split_seeds=(0,), k=3, n_boot=20, parent=parent)
    r = res["results"]["hierarchical, parent = routed model"]
    assert r["parent_model"] == "all/some_model" and not r["leakage"]
    assert r["metrics"]["binary_accuracy"]["value"] == 1.0  # the parent decides the benign/malignant side
    assert "hierarchical, parent = routed model recall" in markdown_tables(res)


def test_subtype_card_names_its_classes_and_output():
    from models.card import CardError, ModelCard, validate_card_dict
    from tests.conftest import ROOT

    card = ModelCard.from_json(ROOT / "magnif_models" / "subtype" / "efficientnet_lite2_subtype" / "card.json")
    assert card.task_kind == "subtype" and card.arch_config["classes"] == list(SUBTYPES)
    assert card.output_format["shape"] == ["B", 8] and card.output_format["kind"] == "log_probability"
    d = card.to_dict()
    d["arch_config"] = {k: v for k, v in d["arch_config"].items() if k != "classes"}
    d.pop("output_format")
    with pytest.raises(CardError, match="names its classes"):
        validate_card_dict(d)
    ev = card.evaluation["subtype_cv"]
    assert ev["n_patients"]["adenosis"] == 2 and "adenosis" in ev["not_testable"]
    assert any("balanced accuracy" in lim for lim in card.limitations)


def test_gradcam_targets_a_subtype_and_refuses_a_wrong_index():
    from PIL import Image

    from models.gradcam import gradcam_heatmap
    from models.inference import load_model_folder
    from tests.conftest import ROOT

    lm = load_model_folder(ROOT / "magnif_models" / "subtype" / "efficientnet_lite2_subtype")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (460, 700, 3), dtype=np.uint8))
    a, b = gradcam_heatmap(lm, img, "Grad-CAM", 4), gradcam_heatmap(lm, img, "Grad-CAM", 6)
    assert a.shape == (460, 700) and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, b)  # another subtype, another map
    with pytest.raises(ValueError, match="subtype index"):
        gradcam_heatmap(lm, img, "Grad-CAM", 8)


@pytest.mark.slow  # end-to-end (issue 29: the default suite stays under 8 minutes; CI runs it)
def test_train_task_subtype_then_predict_end_to_end(tmp_path):
    """Small data built from ../shared (two patients per subtype, three frames each, in a manifest folder):
    train --task subtype, select-defaults, predict --task subtype, and the subtype columns of predict."""
    import csv
    import io
    import shutil
    import subprocess
    import sys

    from tests.conftest import DATA, LITE2, ROOT

    if not DATA.is_dir() or not LITE2.is_file():
        pytest.skip("../shared (BreakHis sample and Lite2 weights) is absent")
    man = pd.read_csv(DATA / "manifest.csv", dtype=str)
    keep = man.groupby("subtype")["patient"].apply(lambda s: sorted(s.unique())[:2]).explode()
    small = man[man["patient"].isin(set(keep))].groupby("patient").head(3)
    data = tmp_path / "breakhis"
    for p in small["path"]:
        (data / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / p, data / p)
    small.to_csv(data / "manifest.csv", index=False)
    root = tmp_path / "models"
    shutil.copytree(ROOT / "magnif_models" / "all" / "efficientnet_lite2_finetuned", root / "all" / "efficientnet_lite2_finetuned")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=900)  # noqa: E731
    r = run("-m", "training", "train", "--task", "subtype", "--strategy", "flat", "--data", str(data),
            "--out", str(root / "subtype" / "lite2_subtype"), "--n-boot", "20", "--split-seeds", "0", "--cv", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("-m", "training", "select-defaults", "--root", str(root))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "subtype: subtype/lite2_subtype balanced accuracy" in r.stdout
    from models.card import ModelCard

    card = ModelCard.from_json(root / "subtype" / "lite2_subtype" / "card.json")
    assert card.task_kind == "subtype" and card.evaluation["strategy"] == "flat"
    assert card.data["patients"] == small["patient"].nunique() and set(card.evaluation["subtype_cv"]["results"]) == {
        "flat", "flat (image-wise split: LEAKAGE)", "hierarchical", "hierarchical (image-wise split: LEAKAGE)"}
    frames = [str(data / p) for p in small["path"].head(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = run("-m", "models", "predict", "--task", "subtype", "--root", str(root), *frames, str(bad))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["path", "task", "model_id", "subtype", "p_subtype", "p_malignant", "top3", "warning"]
    assert all(x["subtype"] in SUBTYPES and 0 < float(x["p_subtype"]) <= 1 for x in rows[:3])
    assert rows[3]["subtype"] == "" and "not a readable image" in rows[3]["warning"]
    r = run("-m", "models", "predict", "--magnification", "100X", "--root", str(root), *frames, str(bad))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {"subtype", "p_subtype", "subtype_model_id"} <= set(rows[0])
    for x in rows:
        if x["decision"] in ("benign", "malignant"):  # a called frame: a subtype on the called side
            assert (SUBTYPES.index(x["subtype"]) >= 4) == (x["decision"] == "malignant")
        else:  # referred or unreadable: never a subtype without a call
            assert x["subtype"] == ""
    r = run("-m", "models", "predict", "--magnification", "100X", "--root", str(root),
            "--model", str(root / "subtype" / "lite2_subtype"), frames[0])
    assert r.returncode == 2 and "use --task subtype" in r.stderr  # a subtype model never answers benign/malignant
