"""Issue 25: the case as the unit of decision, per-magnification calibration, and the seed ensemble served as one model."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.case import CaseFrame, CasePolicy, case_verdict
from models.refer import ReferPolicy, decide
from tests.conftest import make_model_folder

ROOT = Path(__file__).resolve().parent.parent
FRAMES = ROOT.parent / "shared" / "data" / "breakhis_frames"
POLICY = CasePolicy(min_margin=0.2, frame_cap=10, threshold=0.5, target_accuracy=0.85, exponent=0.5)


def test_band_frames_count_toward_the_case_and_refused_frames_do_not():
    # three frames the frame-level band referred as uncertain (p 0.62) and one frame refused by quality control
    band = [CaseFrame(f"b{i}", "100X", "m", 0.62, "refer", "uncertain", kind="band") for i in range(3)]
    refused = CaseFrame("q", "100X", "m", 0.05, "refer", "quality control failed (blur)", kind="qc")
    v = case_verdict([*band, refused], policy=POLICY)
    assert v.n_accepted == 3 and v.n_band == 3 and v.n_referred == 1
    assert v.mean_p == pytest.approx(0.62)  # the refused frame's 0.05 is not averaged in
    assert v.margin == pytest.approx(0.12 * np.sqrt(3))
    assert v.verdict == "malignant", v.reason
    assert [f["counts"] for f in v.frames] == [True, True, True, False]


def test_the_case_policy_refers_a_case_too_close_to_the_threshold_for_its_frames():
    few = [CaseFrame("a", "100X", "m", 0.55, "refer", kind="band")]
    assert case_verdict(few, policy=POLICY).verdict == "refer"  # margin 0.05 < 0.2
    many = [CaseFrame(f"f{i}", "100X", "m", 0.58, "refer", kind="band") for i in range(9)]
    v = case_verdict(many, policy=POLICY)  # margin 0.08 x 3 = 0.24
    assert v.verdict == "malignant" and "clears" in v.reason
    none = case_verdict([CaseFrame("x", "100X", "m", None, "refer", kind="unreadable")], policy=POLICY)
    assert none.verdict == "refer" and none.n_accepted == 0


def test_decisions_say_which_frames_are_evidence():
    pol = ReferPolicy(band=(0.3, 0.7), target_accuracy=0.85, accepted_accuracy=0.9, coverage=0.5, ood_quantile=0.99)
    assert decide(0.6, 0.5, [], False, None, pol).kind == "band"
    assert decide(0.6, 0.5, ["blur"], False, None, pol).kind == "qc"
    assert decide(0.6, 0.5, [], True, None, pol).kind == "not_he"
    assert decide(0.9, 0.5, [], False, None, pol).kind == "call"
    assert decide(None, 0.5, [], False, None, pol).kind == "unreadable"
    assert decide(0.6, 0.5, [], False, None, pol).counts_toward_case
    assert not decide(0.6, 0.5, ["tissue"], False, None, pol).counts_toward_case


def _synthetic_frames(n_pat: int = 30, seed: int = 0, sep: float = 1.5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pat):
        y = int(i % 3 != 0)
        shift = rng.normal(0, 0.5)  # patient effect: frames of one patient are correlated
        for mag in ("40X", "100X"):
            for _ in range(int(rng.integers(3, 12))):
                rows.append({"patient": f"p{i}", "y": y, "magnification": mag,
                             "logit": sep * (2 * y - 1) + shift + rng.normal(0, 1.5), "qc_ok": rng.random() > 0.05})
    return pd.DataFrame(rows)


def test_case_policy_is_fitted_and_validated_on_patients_it_never_saw():
    from training.case_policy import case_policy_for, fit_temperatures, nested_case_evaluation

    fr = _synthetic_frames(sep=0.4)
    pooled, by_mag = fit_temperatures(fr["logit"].to_numpy(), fr["y"].to_numpy(), fr["magnification"].to_numpy(),
                                      fr["patient"].to_numpy())
    assert set(by_mag) == {"40X", "100X"} and all(v["n_patients"]["benign"] >= 5 for v in by_mag.values())
    policy, points = case_policy_for(fr, pooled, by_mag)
    assert 0 < policy.min_margin < 1.6 and policy.exponent in (0.0, 0.25, 0.5) and points
    chosen = [r for r in points if r["min_margin"] == policy.min_margin and r["exponent"] == policy.exponent][0]
    assert chosen["coverage"] >= 0.10 and chosen["accuracy"] >= 0.85
    res = nested_case_evaluation(fr, n_boot=50)
    six = res["by_size"]["6"]["case_policy"]
    assert six["n_patients"]["benign"] + six["n_patients"]["malignant"] <= 30
    assert 0 <= six["coverage"]["value"] <= 1 and six["coverage"]["ci95"][0] <= six["coverage"]["value"]
    assert len(res["outer_margins"]) == 5 and "frames" in res["by_size"]


def test_a_magnification_with_few_patients_keeps_the_pooled_temperature(tmp_path):
    from training.case_policy import fit_temperatures

    fr = _synthetic_frames(n_pat=30)
    few = fr[(fr["magnification"] == "100X") & fr["patient"].isin([f"p{i}" for i in range(6)])].assign(magnification="400X")
    fr = pd.concat([fr, few])
    _, by_mag = fit_temperatures(fr["logit"].to_numpy(), fr["y"].to_numpy(), fr["magnification"].to_numpy(),
                                 fr["patient"].to_numpy())
    assert "400X" not in by_mag and "100X" in by_mag


def _run(folder: Path, train_seed: int, seed: int) -> Path:
    """A 'training run' folder: a scratch Lite2 with a card saying its training seed, and out-of-fold logits."""
    from models.card import ModelCard

    make_model_folder(folder, "efficientnet_lite2", "all", per_mag=["40X", "100X"], seed=seed)
    card = ModelCard.from_json(folder / "card.json")
    card.hyperparameters = {"recipe": "full", "seed": 0, "train_seed": train_seed}
    card.to_json(folder / "card.json")
    pred = pd.read_csv(folder / "predictions.csv")
    rng = np.random.default_rng(seed)
    pred["logit"] = (pred["label"] * 2 - 1) * 0.8 + rng.normal(0, 1, len(pred))
    pred["cv_fold"] = pred["patient"].astype(int) % 5
    pred["source"], pred["part"] = "fixture", "train"
    pred.to_csv(folder / "predictions.csv", index=False)
    (folder / "split.csv").write_text("path,part\n")
    return folder


def test_seed_ensemble_is_one_model_whose_members_are_each_verified(tmp_path):
    from models.inference import ModelIntegrityError, load_model_folder
    from training.ensemble import build_ensemble

    runs = [_run(tmp_path / "runs" / f"r{t}", t, seed=t + 1) for t in (0, 10, 20)]
    res = build_ensemble(runs, tmp_path / "all" / "ens", "all/ens", n_boot=50)
    assert [m["train_seed"] for m in res["members"]] == [0, 10, 20]
    assert -1 <= res["vs_single_run"]["difference"] <= 1 and len(res["vs_single_run"]["ci95"]) == 2
    card = json.loads((tmp_path / "all" / "ens" / "card.json").read_text())
    assert card["architecture"] == "seed_ensemble" and len(card["arch_config"]["members"]) == 3
    assert set(card["temperature_by_magnification"]) <= {"40X", "100X"}
    pred = pd.read_csv(tmp_path / "all" / "ens" / "predictions.csv")
    members = np.stack([pd.read_csv(r / "predictions.csv")["logit"] for r in runs])
    assert np.allclose(pred["logit"], members.mean(0))  # the ensemble logit is the members' mean, no selection
    lm = load_model_folder(tmp_path / "all" / "ens")
    assert len(lm.model.members) == 3
    import torch

    x = torch.rand(2, 3, 230, 350)
    with torch.inference_mode():
        each = torch.stack([m(x) for m in lm.model.members])
        assert torch.allclose(lm.model(x), each.mean(0), atol=1e-5)
    # a member whose bytes changed is refused, even though the card's first weights file is intact
    victim = tmp_path / "all" / "ens" / card["arch_config"]["members"][2]["weights_file"]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        load_model_folder(tmp_path / "all" / "ens")


def test_ensemble_refuses_runs_of_different_folds(tmp_path):
    from training.ensemble import build_ensemble

    a = _run(tmp_path / "a", 0, seed=1)
    b = _run(tmp_path / "b", 10, seed=2)
    pred = pd.read_csv(b / "predictions.csv")
    pred["cv_fold"] = (pred["cv_fold"] + 1) % 5
    pred.to_csv(b / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="folds"):
        build_ensemble([a, b], tmp_path / "out")
    c = shutil.copytree(a, tmp_path / "c")
    with pytest.raises(ValueError, match="training seed"):
        build_ensemble([a, c], tmp_path / "out")


def test_a_loaded_model_uses_its_magnifications_temperature(tmp_path):
    from models.card import MagnificationCalibration, ModelCard
    from models.inference import load_model_folder

    folder = make_model_folder(tmp_path / "all" / "m", "efficientnet_lite2", "all", per_mag=["40X", "100X"])
    card = ModelCard.from_json(folder / "card.json")
    card.temperature = 1.5
    card.temperature_by_magnification = {"100X": MagnificationCalibration(2.5, "fitted (test)")}
    card.to_json(folder / "card.json")
    lm = load_model_folder(folder)
    assert lm.temperature_for("100X") == 2.5 and lm.temperature_for("40X") == 1.5
    assert "fitted for 100X" in lm.calibration_note("100X") and "pooled" in lm.calibration_note("40X")
    import torch

    x = torch.rand(1, 3, 230, 350)
    p100, p40 = lm.probabilities(x, magnification="100X")[0], lm.probabilities(x, magnification="40X")[0]
    z = lm.logits(x)[0]
    assert p100 == pytest.approx(1 / (1 + np.exp(-z / 2.5))) and p40 == pytest.approx(1 / (1 + np.exp(-z / 1.5)))


@pytest.mark.skipif(not FRAMES.is_dir(), reason="../shared/data/breakhis_frames is absent")
def test_case_cli_uses_the_routed_models_case_policy():
    files = sorted(str(p) for p in (FRAMES / "100X").glob("*.png"))[:4]
    r = subprocess.run([sys.executable, "-m", "models", "case", *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["policy"] is not None and out["policy"]["min_margin"] >= 0
    assert out["n_accepted"] == sum(f["counts"] for f in out["frames"])
    assert "case policy" in out["reason"] or "too uncertain" in out["reason"]
