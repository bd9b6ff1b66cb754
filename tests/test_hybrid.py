"""Hybrid CNN + ViT: builders, phased training with TTA/stain/QC/cross-magnification scoring, loading, Grad-CAM."""
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.archs import InitError, build_model
from models.hybrid import MAG_INDEX
from tests.conftest import DATA, LITE2, ROOT, needs_shared


def test_default_hybrid_reads_cnn_tokens_and_takes_turned_frames():
    model, rec = build_model("hybrid", "scratch")
    model.eval()
    assert model.vit_reads == "cnn" and "random initialisation" in rec["vit_branch"]["description"]
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 230, 350)).shape == (2,)
        assert model(torch.zeros(1, 3, 350, 230)).shape == (1,)  # quarter-turned TTA view: position grid resampled
    assert model.vit.last_grid == (11, 8)
    # the published fusion: concat -> LN -> Linear 1024 -> GELU -> LN -> Dropout -> Linear 1024; head -> 512 -> 1
    kinds = [type(m).__name__ for m in model.fusion]
    assert kinds == ["LayerNorm", "Linear", "GELU", "LayerNorm", "Dropout", "Linear"]
    assert model.fusion[1].out_features == 1024 and model.head[1].out_features == 512
    assert model.head[-1].out_features == 1


def test_magnification_embedding_is_required_when_configured():
    model, _ = build_model("hybrid", "scratch", {"magnification_embedding": 8})
    model.eval()
    x = torch.zeros(2, 3, 230, 350)
    with pytest.raises(ValueError, match="magnification"):
        model(x)
    mags = torch.tensor([MAG_INDEX["40X"], MAG_INDEX["400X"]])
    with torch.inference_mode():
        assert model(x, mags).shape == (2,)


def test_published_pairing_builds_and_vit_init_loads_a_local_checkpoint(tmp_path):
    import torchvision.models as tvm

    ref = tvm.vit_b_16(weights=None)
    ckpt = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), ckpt)
    model, rec = build_model("hybrid", "scratch", {"cnn": "efficientnet_v2_s", "vit": "vit_b_16"}, vit_init=str(ckpt))
    assert model.vit_reads == "image" and rec["vit_branch"]["file"] == "vit.pth"
    assert torch.equal(model.vit.vit.encoder.layers[0].mlp[0].weight, ref.encoder.layers[0].mlp[0].weight)
    model.eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 230, 350)).shape == (1,)
    # a checkpoint for the wrong model is refused, never half-loaded
    torch.save({"nonsense.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(InitError, match="does not fit"):
        build_model("hybrid", "scratch", vit_init=str(tmp_path / "bad.pth"))


def test_vit_imagenet_init_fails_clearly_without_weights():
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if any(hub.glob("vit_b_16*")):
        pytest.skip("ViT-B/16 ImageNet weights are cached on this machine")
    with pytest.raises(InitError, match="--vit-init"):
        build_model("hybrid", "scratch", {"vit": "vit_b_16"}, vit_init="imagenet")


def small_manifest(dest: Path, per_label: int = 3, own: int = 4, other: int = 2) -> Path:
    """A manifest folder: a few 100X patients per label with some frames at other magnifications, plus one
    patient with no 100X frame (a patient the 100X model can never have seen)."""
    man = pd.read_csv(DATA / "manifest.csv", dtype=str)
    p100 = set(man.loc[man["magnification"] == "100X", "patient"])
    rows = []
    for label in ("benign", "malignant"):
        pats = sorted(p for p in man.loc[man["label"] == label, "patient"].unique() if p in p100)
        # prefer patients that also have frames at another magnification
        pats = sorted(pats, key=lambda p: -(man[(man["patient"] == p) & (man["magnification"] != "100X")].shape[0] > 0))
        for p in pats[:per_label]:
            d = man[man["patient"] == p]
            rows += d[d["magnification"] == "100X"].head(own).to_dict("records")
            rows += d[d["magnification"] != "100X"].head(other).to_dict("records")
    unseen = sorted(set(man["patient"]) - p100)[0]
    rows += man[man["patient"] == unseen].head(other).to_dict("records")
    out = pd.DataFrame(rows)
    for r in rows:
        (dest / Path(r["path"]).parent).mkdir(parents=True, exist_ok=True)
        Image.open(DATA / r["path"]).save(dest / r["path"])
    out.to_csv(dest / "manifest.csv", index=False)
    return dest


@needs_shared
@pytest.mark.slow  # end-to-end (issue 29: the default suite stays under 8 minutes; CI runs it)
def test_hybrid_phased_cv_with_stain_tta_qc_and_cross_magnification(tmp_path):
    from models.gradcam import cam_branches, gradcam_heatmap
    from models.inference import load_model_folder
    from training.engine import FitConfig
    from training.hybrid import HybridConfig
    from training.splits import assert_patient_disjoint
    from training.train import rescore, run_train

    data = small_manifest(tmp_path / "data")
    out = tmp_path / "models" / "all" / "hybrid"
    card = run_train(str(data), "100X", "hybrid", str(LITE2), out, FitConfig(), cv=2, n_boot=20,
                     cache_dir=tmp_path / "cache", stain="reinhard", eval_tta=True,
                     hc=HybridConfig(p1_epochs=3, p2_epochs=1, p3_epochs=1, batch_size=8))
    # phased fine-tuning is recorded per fold, with each phase's schedule and best validation AUC
    phases = card.recipe["phases_per_fold"]
    assert len(phases) == 2 and [p["phase"][0] for p in phases[0]] == ["1", "2", "3"]
    assert {"max_epochs", "best_epoch", "best_val_auc"} <= set(phases[0][1])
    assert card.arch_config["vit"] == "hybrid" and card.arch_config["cnn"] == "efficientnet_lite2"
    # stain targets fitted on the training frames travel in the card
    st = card.preprocess.stain
    assert st["method"] == "reinhard" and len(st["target_means"]) == 3 and st["fitted_on_frames"] > 0
    # TTA and QC-filtered figures beside the plain ones
    assert "auc" in card.evaluation["tta"]["overall"]["metrics"]
    assert card.evaluation["qc"]["n_images"] == sum(card.evaluation["overall"]["n_images"].values())
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient": str})
    assert pred["logit_tta"].notna().all() and pred["qc_pass"].dtype == bool
    assert not np.allclose(pred["logit"], pred["logit_tta"])
    # cross-magnification: other magnifications' frames, predicted only by models that never saw the patient
    xm = pd.read_csv(out / "predictions_cross_magnification.csv", dtype={"patient": str})
    assert len(xm) and not (xm["magnification"] == "100X").any()
    split = pd.read_csv(out / "split.csv", dtype={"patient": str})
    for _, r in xm.iterrows():
        if r["predicted_by"].startswith("fold"):
            k = int(r["predicted_by"].split()[1])
            assert r["patient"] in set(split.loc[split["cv_fold"] == k, "patient"])
        else:
            assert r["patient"] not in set(split["patient"])
    assert any(p.startswith("final model") for p in xm["predicted_by"])
    assert set(card.evaluation["cross_magnification"]) - {"protocol"} <= {"40X", "200X", "400X"}
    # ... and with TTA from the same models, which the tables read through ModelCard.summaries_at
    assert xm["logit_tta"].notna().all() and xm["p_tta"].between(0, 1).all()

    some = next(m for m in card.evaluation["cross_magnification"] if m != "protocol")
    plain, with_tta = card.summaries_at(some)
    assert with_tta is not None and with_tta["n_images"] == plain["n_images"]
    from app.dashboard import cross_magnification_rows
    assert not cross_magnification_rows(card)["AUC with 8-view TTA"].eq("not measured").any()
    assert_patient_disjoint(split["patient"], split["cv_fold"])
    again = rescore(out, n_boot=20)
    assert again.evaluation["tta"]["overall"]["metrics"] == card.evaluation["tta"]["overall"]["metrics"]

    # the folder loads through models/ (sha256 checked), applies the card's stain normalisation, and explains
    lm = load_model_folder(out)
    frame = data / pred["path"].iloc[0] if not Path(pred["path"].iloc[0]).is_absolute() else Path(pred["path"].iloc[0])
    img = Image.open(frame).convert("RGB")
    raw = lm.model(lm.preprocess(img).unsqueeze(0)).item()
    lm.card.preprocess.stain = None
    assert lm.model(lm.preprocess(img).unsqueeze(0)).item() != pytest.approx(raw, abs=1e-6)
    lm.card.preprocess.stain = st
    assert cam_branches(lm) == ["cnn", "vit", "combined"]
    for b in cam_branches(lm):
        h = gradcam_heatmap(lm, img, branch=b)
        assert h.shape == (img.height, img.width) and 0 <= h.min() and h.max() <= 1
    # predict CLI with --tta runs on the hybrid
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--model", str(out),
                        "--tta", str(frame)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    row = next(csv.DictReader(io.StringIO(r.stdout)))
    assert 0 <= float(row["p_malignant"]) <= 1


def test_final_schedule_follows_the_folds():
    from training.hybrid import HybridConfig, final_schedule

    def fold(chosen: str, e1: int, e2: int | None, e3: int | None) -> dict:
        return {"phase_chosen": chosen, "phases": [{"best_epoch": e1}, {"best_epoch": e2}, {"best_epoch": e3}]}

    hc = HybridConfig(p1_epochs=30, p2_epochs=2, p3_epochs=1)
    # most folds peaked in phase 1: the refit trains phase 1 only, for the median best epoch
    s = final_schedule(hc, [fold("1: a", 10, 1, 1), fold("1: a", 14, 2, 1), fold("2: b", 20, 2, 1)])
    assert (s.p1_epochs, s.p2_epochs, s.p3_epochs) == (14, 0, 0)
    # most folds peaked in phase 3: all three phases run
    s = final_schedule(hc, [fold("3: c", 10, 2, 1), fold("3: c", 12, 1, 1), fold("2: b", 8, 2, 1)])
    assert (s.p1_epochs, s.p2_epochs, s.p3_epochs) == (10, 2, 1)
