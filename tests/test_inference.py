import json
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image
from safetensors.torch import save_file

from models.archs import ARCHITECTURES, build_model, file_sha256
from models.card import ModelCard, PreprocessConfig
from models.inference import ModelIntegrityError, load_model_folder
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "100X" / "efficientnet_lite2"
    out.mkdir(parents=True)
    model, rec = build_model("efficientnet_lite2", "scratch")
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    spec = ARCHITECTURES["efficientnet_lite2"]
    ModelCard(model_id="100X/efficientnet_lite2", architecture="efficientnet_lite2", magnification="100X",
              preprocess=PreprocessConfig(spec.input_size, spec.mean, spec.std), init=rec, temperature=1.7,
              weights_sha256=file_sha256(out / "model.safetensors")).to_json(out / "card.json")
    (out.parent.parent / "defaults.json").write_text(json.dumps({"100X": {"model_id": "100X/efficientnet_lite2", "auc": 0.5, "n_patients": {"benign": 1, "malignant": 1}}}))
    return out


def test_sha256_mismatch_is_refused(tiny_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x00" * 10)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model_folder(bad)
    assert load_model_folder(tiny_folder).card.temperature == 1.7


def test_predict_cli_keeps_going_after_bad_files(tiny_folder, tmp_path):
    good = tmp_path / "good frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (460, 700, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    missing = tmp_path / "missing.png"
    files = [str(bad), str(good), str(missing)]
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X",
                        "--root", str(tiny_folder.parent.parent), *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["path"] for x in rows] == files
    assert rows[0]["p_malignant"] == "" and "not a readable image" in rows[0]["warning"]
    assert rows[2]["p_malignant"] == "" and "not found" in rows[2]["warning"]
    p = float(rows[1]["p_malignant"])
    assert 0 <= p <= 1 and rows[1]["label"] in ("benign", "malignant") and rows[1]["model_id"] == "100X/efficientnet_lite2"
    lm = load_model_folder(tiny_folder)
    # the CLI (its own process) and this process agree to float32 precision: oneDNN may pick other kernels per process
    assert p == pytest.approx(float(lm.predict_images([Image.open(good).convert("RGB")])[0]), abs=1e-6)


def test_predict_cli_without_a_model_says_what_to_train(tmp_path):
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "400X", "--root", str(tmp_path), "x.png"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "python -m training train" in r.stderr and "Traceback" not in r.stderr


def test_tta_is_invariant_to_dihedral_transforms(tiny_folder):
    lm = load_model_folder(tiny_folder)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (460, 700, 3), np.uint8))
    p = lm.predict_images([img], tta=True)[0]
    for t in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM):
        assert lm.predict_images([img.transpose(t)], tta=True)[0] == pytest.approx(p, abs=1e-5)
    assert lm.predict_images([img])[0] != pytest.approx(p, abs=1e-9)


def test_feature_averaged_tta_equals_mean_of_view_logits():
    """Training scores logreg TTA as head(mean of 8 views' features); it must equal the mean view logit."""
    from models.archs import build_model
    from models.card import PreprocessConfig
    from models.inference import tta_logits
    from models.preprocess import normalize_uint8
    from training.engine import extract_features

    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite2", "scratch")
    model.eval()
    cfg = PreprocessConfig((64, 96), (0.5,) * 3, (0.5,) * 3)
    imgs = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    f = extract_features(model, imgs, cfg, tta=True)
    w, b = model.fc.weight.detach().double().numpy()[0], float(model.fc.bias.detach())
    with torch.inference_mode():
        direct = tta_logits(model, normalize_uint8(imgs, cfg))
    assert f.astype(np.float64) @ w + b == pytest.approx(direct, abs=1e-4)
