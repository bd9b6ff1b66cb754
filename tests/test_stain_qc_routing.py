"""Stain normalisation (torchstain), QC split helpers and cross-magnification routing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.card import ModelCard, PreprocessConfig
from models.preprocess import ImageError, frame_to_uint8
from models.quality import check_quality, qc_failures
from models.stain import StainError, _lab_stats, fit_stain, normalize_stain
from tests.conftest import FRAMES, make_model_folder

CFG = PreprocessConfig((230, 350), (0.5,) * 3, (0.5,) * 3)


def _frames(n=4):
    paths = sorted(FRAMES.glob("*/*.png"))[:n]
    if not paths:
        pytest.skip("../shared/data/breakhis_frames is absent")
    return [frame_to_uint8(Image.open(p).convert("RGB"), CFG) for p in paths]


def test_reinhard_maps_a_frame_onto_the_training_statistics():
    frames = _frames()
    st = fit_stain("reinhard", frames)
    assert st["fitted_on_frames"] == 4
    target = np.array(st["target_means"])
    odd = (frames[0].float() * torch.tensor([0.8, 1.0, 1.15]).view(3, 1, 1)).clamp(0, 255).to(torch.uint8)
    out = normalize_stain(odd, st)
    assert out.dtype == torch.uint8 and out.shape == odd.shape
    before = np.abs(_lab_stats(odd)[:, 0] - target).sum()
    after = np.abs(_lab_stats(out)[:, 0] - target).sum()
    assert after < before / 3  # the colour cast is largely removed


def test_macenko_fits_and_refuses_frames_without_stain():
    frames = _frames()
    st = fit_stain("macenko", frames)
    assert np.array(st["he_ref"]).shape == (3, 2) and len(st["max_c_ref"]) == 2
    out = normalize_stain(frames[1], st)
    assert out.dtype == torch.uint8 and out.shape == frames[1].shape
    white = torch.full((3, 230, 350), 250, dtype=torch.uint8)
    with pytest.raises(StainError):
        normalize_stain(white, st)
    # preprocessing: with notes the frame is used as is and the user told; in training it is skipped loudly
    cfg = PreprocessConfig((230, 350), (0.5,) * 3, (0.5,) * 3, stain=st)
    notes: list[str] = []
    t = frame_to_uint8(Image.new("RGB", (700, 460), (250, 250, 250)), cfg, notes)
    assert t.shape == (3, 230, 350) and "without stain normalisation" in notes[0]
    with pytest.raises(ImageError, match="macenko"):
        frame_to_uint8(Image.new("RGB", (700, 460), (250, 250, 250)), cfg)
    with pytest.raises(ValueError, match="unknown stain"):
        fit_stain("vahadane", frames)


def test_stain_targets_round_trip_through_the_card(tmp_path):
    st = fit_stain("reinhard", _frames(2))
    card = ModelCard("all/x", "efficientnet_lite2", "all", PreprocessConfig((230, 350), (0.5,) * 3, (0.5,) * 3, stain=st), {})
    card.to_json(tmp_path / "card.json")
    assert ModelCard.from_json(tmp_path / "card.json").preprocess.stain == json.loads(json.dumps(st))


def test_qc_failures_name_the_failed_checks():
    white = Image.new("RGB", (700, 460), (245, 245, 245))
    assert "tissue" in qc_failures(check_quality(white))
    green = Image.new("RGB", (700, 460), (30, 160, 40))
    assert "he_colour" in qc_failures(check_quality(green))
    frame = Image.open(sorted(FRAMES.glob("*/*.png"))[0]).convert("RGB") if FRAMES.is_dir() else None
    if frame is not None:
        assert qc_failures(check_quality(frame)) == []


def test_borrowed_model_is_routed_only_where_its_cross_magnification_check_wins(tmp_path):
    from app.dashboard import inventory
    from models.routing import resolve
    from models.metrics import summarize
    from models.routing.rule import select_defaults

    make_model_folder(tmp_path / "all" / "lite", "efficientnet_lite2", "all", per_mag=["40X", "100X"], seed=1, signal=0.1)
    own = make_model_folder(tmp_path / "100X" / "lite", "efficientnet_lite2", "100X", seed=2, signal=0.2)
    card = ModelCard.from_json(own / "card.json")
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    pats = np.repeat(np.arange(12), 5).astype(str)
    strong = summarize(y, np.clip(0.8 * y + 0.2 * rng.random(60), 0, 1), pats, n_boot=20)
    card.evaluation["cross_magnification"] = {"protocol": "test", "40X": strong}
    card.to_json(own / "card.json")
    d = select_defaults(tmp_path)
    assert d["40X"]["model_id"] == "100X/lite" and d["40X"]["borrowed"]
    assert "borrowed" in " ".join(resolve("malignancy", "40X", tmp_path).notes)
    assert "no ImageNet-pretrained candidate" in d["40X"]["reason"]  # fixtures are scratch: highest AUC, flagged
    assert inventory(tmp_path).set_index("magnification").loc["40X", "borrowed"]


def test_pick_recipe_ships_the_better_stain_variant_and_refuses_different_folds(tmp_path):
    from training.evaluate import pick_better

    folds = [{"test_patients": ["a", "b"]}, {"test_patients": ["c", "d"]}]
    variants = {}
    for st, signal, seed in (("none", 0.1, 1), ("reinhard", 0.6, 2)):
        d = make_model_folder(tmp_path / "cand" / f"hybrid_stain-{st}", "hybrid", "all", seed=seed, signal=signal)
        c = ModelCard.from_json(d / "card.json")
        c.evaluation["per_fold"] = folds
        if st != "none":
            c.preprocess.stain = {"method": st, "target_means": [70.0, 15.0, -9.0], "target_stds": [10.0, 8.0, 6.0]}
        c.to_json(d / "card.json")
        variants[st] = d
    sel = pick_better(list(variants.values()), tmp_path / "all" / "hybrid")
    shipped = ModelCard.from_json(tmp_path / "all" / "hybrid" / "card.json")
    assert sel["chosen"] == "phased (hybrid)" and shipped.preprocess.stain["method"] == "reinhard"
    assert shipped.model_id == "all/hybrid" and "stain reinhard" in shipped.changelog[-1]
    assert {r["stain"] for r in sel["candidates"]} == {"none", "reinhard"}
    # Shipping again after a retrain keeps the folder's history and says what was replaced.
    first_history = list(shipped.changelog)
    c = ModelCard.from_json(variants["reinhard"] / "card.json")
    c.weights_sha256 = "f" * 64
    c.changelog = ["retrained"]
    c.to_json(variants["reinhard"] / "card.json")
    pick_better(list(variants.values()), tmp_path / "all" / "hybrid")
    again = ModelCard.from_json(tmp_path / "all" / "hybrid" / "card.json").changelog
    assert again[:len(first_history)] == first_history and "replaced the previous weights" in again[len(first_history)]
    assert again[-2] == "retrained" and "stain reinhard" in again[-1]
    c = ModelCard.from_json(variants["none"] / "card.json")
    c.evaluation["per_fold"] = folds[:1]
    c.to_json(variants["none"] / "card.json")
    with pytest.raises(ValueError, match="same outer folds"):
        pick_better(list(variants.values()), tmp_path / "other")
