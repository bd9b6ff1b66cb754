"""IDC patches (issue 17, second part): the three layouts, names and coordinates, patient-wise CV."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.idc import parse_patch_name, region_map
from training.idc import burden_table, idc_cv, index_idc


def _patch(path, colour=(200, 120, 190)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (50, 50), colour).save(path)


def test_names_and_coordinates():
    n = parse_patch_name("8863_idx5_x1001_y851_class1.png")
    assert (n.patient, n.x, n.y, n.label) == ("8863", 1001, 851, 1)
    assert parse_patch_name("SOB_B_A-14-22549AB-100-001.png") is None
    m = region_map(np.array([1001, 1051, 1001]), np.array([851, 851, 901]), np.array([0.1, 0.9, 0.5]))
    assert m.shape == (2, 2) and m[0, 1] == 0.9 and m[1, 0] == 0.5 and np.isnan(m[1, 1])


def test_the_three_layouts_give_the_same_index(tmp_path):
    names = ["10_idx5_x0_y0_class0.png", "10_idx5_x50_y0_class1.png", "11_idx5_x0_y50_class1.png"]
    flat, tree, man = tmp_path / "flat", tmp_path / "tree", tmp_path / "man"
    for n in names:
        _patch(flat / n)
        p = parse_patch_name(n)
        _patch(tree / p.patient / str(p.label) / n)
        _patch(man / "x" / n)
    pd.DataFrame({"path": [f"x/{n}" for n in names], "label": ["idc_negative", "idc_positive", "idc_positive"],
                  "patient": ["10", "10", "11"]}).to_csv(man / "manifest.csv", index=False)
    cols = ["y", "patient", "x", "y_coord"]
    a, b, c = (index_idc(d)[cols].sort_values(cols).reset_index(drop=True) for d in (flat, tree, man))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    _patch(tree / "10" / "1" / "10_idx5_x99_y0_class0.png")  # the folder says 1, the name 0: refused
    with pytest.raises(ValueError, match="folder says class 1"):
        index_idc(tree)


def test_idc_cv_is_patient_wise_and_compares_sizes():
    rng = np.random.default_rng(0)
    rows, f_small, f_big = [], [], []
    for pat in range(20):
        off = rng.normal(0, 1, 8)
        for i in range(10):
            yv = int(i < 4)
            rows.append({"patient": str(pat), "y": yv, "x": 50 * i, "y_coord": 0})
            f_small.append(off + rng.normal(0, 1, 8) + 0.5 * yv)
            f_big.append(off + rng.normal(0, 1, 8) + 2.0 * yv)
    df = pd.DataFrame(rows)
    res = idc_cv(df, {112: np.array(f_small), 224: np.array(f_big)}, split_seeds=(0,), k=4, n_boot=50)
    assert res["n_patients"] == 20
    assert res["sizes"]["224"]["summary"]["auc"]["value"] > res["sizes"]["112"]["summary"]["auc"]["value"]
    d = res["paired_difference"]["224 minus 112"]
    assert d["difference"] > 0 and d["ci95"][0] > 0
    bt = burden_table(df, np.tile([0.9] * 4 + [0.1] * 6, 20))
    assert np.allclose(bt["labelled_burden"], 0.4) and np.allclose(bt["predicted_burden"], 0.4)


@pytest.mark.slow  # end-to-end (issue 29: the default suite stays under 8 minutes; CI runs it)
def test_train_idc_then_predict_task_idc_end_to_end(tmp_path):
    """Small data built from ../shared/data/idc in the public tree layout: train-idc, select-defaults, predict."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT, SHARED

    src = SHARED / "data" / "idc"
    if not (src / "manifest.csv").is_file() or not (SHARED / "weights").is_dir():
        pytest.skip("../shared/data/idc or ../shared/weights is absent")
    df = index_idc(src)
    keep = sorted(df.loc[df["y"] == 1, "patient"].unique())[:10]
    data = tmp_path / "idc_tree"
    for r in df[df["patient"].isin(keep)].to_dict("records"):
        dst = data / r["patient"] / str(r["y"]) / Path(r["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], dst)
    root = tmp_path / "models"
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run("-m", "training", "train-idc", "--data", str(data), "--out", str(root / "idc" / "lite2_idc"), "--size", "64",
            "--n-boot", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("-m", "training", "select-defaults", "--root", str(root))
    assert r.returncode == 0, r.stderr[-2000:]
    from models.card import ModelCard

    card = ModelCard.from_json(root / "idc" / "lite2_idc" / "card.json")
    assert card.task_kind == "idc" and card.evaluation["idc_cv"]["n_patients"] == 10 and card.preprocess.input_size == (64, 64)
    patches = sorted(data.rglob("*.png"))[:4]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = run("-m", "models", "predict", "--task", "idc", "--root", str(root), *map(str, patches), str(bad))
    assert r.returncode == 0, r.stderr[-2000:]
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["path", "task", "model_id", "p_idc", "label", "warning"]
    assert len(rows) == 5 and all(0 <= float(x["p_idc"]) <= 1 for x in rows[:4])
    assert {x["label"] for x in rows[:4]} <= {"IDC-positive", "IDC-negative"} and rows[4]["p_idc"] == ""
    assert "not a readable image" in rows[4]["warning"] and all(x["task"] == "idc" for x in rows)
    r = run("-m", "models", "predict", "--task", "malignancy", "--magnification", "100X", "--root", str(root),
            "--model", str(root / "idc" / "lite2_idc"), str(patches[0]))
    assert r.returncode == 2 and "use --task idc" in r.stderr  # an IDC model never answers the frame question
    r = run("-m", "training", "train-idc", "--data", str(data), "--out", str(tmp_path / "v2"), "--arch", "efficientnet_v2_s")
    assert r.returncode == 2 and "needs --weights" in r.stderr and not (tmp_path / "v2").exists()


def test_the_shipped_idc_model_loads_verified_and_ranks_patches():
    from models.engine import IdcPredictor
    from models.inference import load_model_folder
    from models.routing import default_model_id
    from tests.conftest import ROOT, SHARED

    mid = default_model_id("idc", ROOT / "magnif_models")
    # issue 25: the fine-tuned model displaced the frozen one by the paired rule on identical patient folds
    assert mid == "idc/efficientnet_lite2_idc_finetuned"
    lm = load_model_folder(ROOT / "magnif_models" / mid)  # sha256 checked against the card
    vs = lm.card.evaluation["vs_routed"]
    assert lm.card.task_kind == "idc" and lm.card.data["patients"] >= 200
    assert vs["incumbent"] == "idc/efficientnet_lite2_idc" and vs["ci95"][0] > 0 and vs["same_folds"]
    frozen = load_model_folder(ROOT / "magnif_models" / "idc" / "efficientnet_lite2_idc")
    assert frozen.card.evaluation["idc_cv"]["n_patients"] >= 200
    if not (SHARED / "data" / "idc").is_dir():
        pytest.skip("../shared/data/idc is absent")
    df = index_idc(SHARED / "data" / "idc").groupby("y").head(30)
    res = IdcPredictor(lm).predict([(p, p) for p in df["path"]])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(df["y"], [r.p_idc for r in res]) > 0.75  # training patches: a smoke test, not a figure
