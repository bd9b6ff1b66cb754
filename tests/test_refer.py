"""Refer, don't guess (issue 16, part 1): decisions, the uncertainty band, and the shipped policy."""
import io

import numpy as np
import pytest
from PIL import Image

from models.quality import QualityReport
from models.refer import OODScorer, ReferPolicy, decide
from tests.conftest import ROOT

ROUTED = ROOT / "magnif_models" / "all" / "efficientnet_lite2_finetuned"


def _policy(ood_threshold=10.0):
    d = 4
    return ReferPolicy(band=(0.4, 0.6), target_accuracy=0.85, accepted_accuracy=0.9, coverage=0.5, ood_quantile=0.99,
                       ood=OODScorer(np.zeros(d), np.eye(2, d), np.eye(2), 1.0, ood_threshold))


def test_decisions_in_order_of_how_little_the_probability_can_be_trusted():
    pol = _policy()
    assert decide(None, 0.5, [], False, None, pol).decision == "refer"
    assert "quality control" in decide(0.9, 0.5, ["blur"], False, 0.0, pol).reason
    assert "not an H&E" in decide(0.9, 0.5, [], True, 0.0, pol).reason
    assert "unlike the training frames" in decide(0.9, 0.5, [], False, 50.0, pol).reason
    assert "uncertain" in decide(0.55, 0.5, [], False, 1.0, pol).reason
    assert decide(0.9, 0.5, [], False, 1.0, pol).decision == "malignant"
    assert decide(0.1, 0.5, [], False, 1.0, pol).decision == "benign"
    assert "no referral policy" in decide(0.55, 0.5, [], False, None, None).reason


def test_band_is_the_narrowest_reaching_the_target():
    from training.refer import choose_band, risk_coverage

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(y * 0.3 + 0.35 + rng.normal(0, 0.15, 2000), 0, 1)  # confident frames are mostly right
    pts = risk_coverage(y, p, 0.5, np.round(np.arange(0, 0.5, 0.01), 3))
    assert pts[0]["coverage"] > 0.99 and pts[-1]["coverage"] < pts[0]["coverage"]
    band, chosen, note = choose_band(pts, 0.9, 0.5)
    assert chosen["accuracy"] >= 0.9 and "narrowest" in note
    narrower = [r for r in pts if r["half_width"] < chosen["half_width"] and r["coverage"] >= 0.1]
    assert all(r["accuracy"] < 0.9 for r in narrower)
    assert band == (0.5 - chosen["half_width"], 0.5 + chosen["half_width"])
    _, _, note = choose_band(pts, 1.01, 0.5)  # unreachable
    assert "no band reaches" in note


def test_shipped_routed_model_refers_plain_colour_and_gradient_frames():
    from models.inference import load_model_folder

    lm = load_model_folder(ROUTED)
    assert lm.policy is not None and lm.policy.ood is not None  # fitted for this very card (sha256 checked)
    flat = Image.new("RGB", (700, 460), (200, 120, 190))  # H&E-like colour, no tissue
    grad = Image.fromarray(np.broadcast_to(np.linspace(0, 255, 700)[None, :, None] * np.array([0.8, 0.4, 0.7]),
                                           (460, 700, 3)).astype(np.uint8))
    from models.engine import MalignancyPredictor

    pred = MalignancyPredictor(lm, magnification="100X")
    for img in (flat, grad):
        b = io.BytesIO()
        img.save(b, "PNG")
        d = pred.predict_one(("flat.png", b.getvalue()))
        assert d.decision == "refer" and d.reason, d


def test_a_policy_for_another_card_version_is_not_used(tmp_path):
    import shutil

    from models.inference import load_model_folder

    dst = tmp_path / "all" / "m"
    shutil.copytree(ROUTED, dst)
    card = (dst / "card.json").read_text().replace('"changelog": [', '"changelog": [\n  "edited",', 1)
    (dst / "card.json").write_text(card)
    lm = load_model_folder(dst)
    assert lm.policy is None and "another version of this card" in lm.policy_note
    passing = QualityReport(blur_variance=1e3, tissue_fraction=0.9, he_fraction=0.9)
    from models.refer import decide

    assert "another version" in decide(0.9, 0.5, [], False, None, lm.policy, lm.policy_note).reason  # said each call
    assert passing.blur_variance > 0
    (dst / "refer.json").write_text("{not json")
    assert "could not be read" in load_model_folder(dst).policy_note


def test_one_pass_prediction_with_ood_equals_the_plain_prediction():
    """The logit and the OOD embedding come from one forward; the probability must not change by it."""
    from models.inference import load_model_folder
    from models.refer import embed

    lm = load_model_folder(ROUTED)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (460, 700, 3), np.uint8)) for i in range(3)]
    ood: list = []
    p1 = lm.predict_images(frames, embeddings=ood)
    p0 = lm.predict_images(frames)
    np.testing.assert_allclose(p1, p0, atol=1e-9)
    x = lm.preprocess(frames[1]).unsqueeze(0)
    np.testing.assert_allclose(ood[1], lm.policy.ood.score(embed(lm.model, x))[0], rtol=1e-6)
