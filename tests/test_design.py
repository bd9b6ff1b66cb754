"""The shape of the code (issue 14): one typed, versioned card refused when tampered; a validated routing file;
one architecture registry; paths from configuration; imports that stay layered."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.card import (CARD_VERSION, CardError, ModelCard, card_schema, metric, migrate_card,
                         validate_card_dict)
from models.routing import DefaultsError, read_defaults

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "magnif_models").glob("*/*/card.json"))
REFERENCE = ROOT / "magnif_models" / "all" / "efficientnet_lite2_finetuned" / "card.json"


def shipped_dict() -> dict:
    """The reference card as a current-version dict (shipped files may be an older version, migrated on load)."""
    return migrate_card(json.loads(REFERENCE.read_text()))


def test_every_shipped_card_is_current_and_valid():
    assert SHIPPED
    for f in SHIPPED:
        c = ModelCard.from_json(f)
        assert c.card_version == CARD_VERSION, f
        kind = "log_probability" if c.task_kind == "subtype" else "logit"
        assert c.output_format["kind"] == kind and c.input_format["shape"][-2:] == list(c.preprocess.input_size)


def test_exported_schema_matches_the_code():
    """magnif_models/card.schema.json is what card_schema() gives today (regenerate: python -m models card-schema)."""
    assert json.loads((ROOT / "magnif_models" / "card.schema.json").read_text()) == card_schema()


@pytest.mark.parametrize("edit, field", [
    ({"temperature": -1.65}, "temperature"),
    ({"temperature": 0.0}, "temperature"),
    ({"threshold": 0.99}, "threshold"),
    ({"preprocess": "input_size=20000"}, "preprocess.input_size"),
    ({"surprise_field": 1}, "surprise_field: unknown field"),
    ({"weights_file": "../../etc/passwd"}, "weights_file"),
    ({"magnification": "1000X"}, "magnification"),
    ({"card_version": 99}, "newer than this software"),
])
def test_tampered_card_is_refused_with_one_line(tmp_path, edit, field):
    d = shipped_dict()
    if edit.get("preprocess"):
        d["preprocess"] = {**d["preprocess"], "input_size": [20000, 20000]}
    else:
        d.update(edit)
    f = tmp_path / "card.json"
    f.write_text(json.dumps(d))
    with pytest.raises(CardError) as e:
        ModelCard.from_json(f)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and str(f) in msg, msg


def test_tampered_card_is_refused_by_the_loader_and_the_cli(tmp_path):
    src = REFERENCE.parent
    dst = tmp_path / "all" / "tampered"
    dst.mkdir(parents=True)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    d = shipped_dict()
    d["temperature"] = -d["temperature"]  # would invert every probability
    (dst / "card.json").write_text(json.dumps(d))
    from models.inference import load_model_folder

    with pytest.raises(CardError):
        load_model_folder(dst)
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--model", str(dst),
                        str(ROOT / "README.md")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
    assert "temperature" in r.stderr and "Traceback" not in r.stderr


def test_a_version_1_card_is_migrated_without_touching_the_weights():
    d = shipped_dict()
    d["card_version"] = 1
    d["serves"] = {}
    for k in ("input_format", "output_format", "task_kind"):
        d.pop(k)
    c = validate_card_dict(migrate_card(d))
    assert c.card_version == CARD_VERSION and "migrated from card_version 1" in c.changelog[-1]
    assert c.task_kind == "malignancy"  # v2 -> v3: every older card is a benign/malignant frame model
    assert c.weights_sha256 == shipped_dict()["weights_sha256"]
    d["serves"] = {"100X": "routed"}  # routing written into a card: never carried over silently
    with pytest.raises(CardError, match="select-defaults"):
        migrate_card(d)


def test_an_input_format_that_disagrees_with_preprocess_is_refused():
    d = shipped_dict()
    d["input_format"] = {**d["input_format"], "shape": ["B", 3, 20000, 20000]}
    with pytest.raises(CardError, match="input_format"):
        validate_card_dict(d)


def test_training_cannot_write_an_invalid_card(tmp_path):
    c = ModelCard.from_json(REFERENCE)
    c.threshold = 0.999
    with pytest.raises(CardError, match="threshold"):
        c.to_json(tmp_path / "card.json")
    assert not (tmp_path / "card.json").exists()


def test_metric_reads_summaries_in_one_place():
    c = ModelCard.from_json(REFERENCE)
    m = c.metric_at("100X")
    raw = c.per_magnification["100X"]["metrics"]["auc"]
    assert (m.value, list(m.ci95)) == (raw["value"], raw["ci95"])
    assert metric(None) is None and metric({"metrics": {}}, "auc") is None
    plain, tta = c.summaries_at("100X")
    assert plain is c.per_magnification["100X"] and tta is c.evaluation["tta"]["per_magnification"]["100X"]


@pytest.mark.parametrize("text, expect", [
    ("{bad", "not valid JSON"),
    ("[1, 2]", "valid dictionary"),
    ('{"100X": {"auc": 0.7, "n_patients": {"benign": 1, "malignant": 1}}}', "100X.model_id: field required"),
    ('{"100X": {"model_id": "../../etc", "auc": 0.7, "n_patients": {"benign": 1, "malignant": 1}}}', "100X.model_id"),
    ('{"1000X": {"model_id": "all/x", "auc": 0.7, "n_patients": {"benign": 1, "malignant": 1}}}', "1000X"),
    ('{"100X": {"model_id": "all/x", "auc": 7, "n_patients": {"benign": 1, "malignant": 1}}}', "100X.auc"),
])
def test_a_bad_routing_file_is_one_clear_error(tmp_path, text, expect):
    (tmp_path / "defaults.json").write_text(text)
    with pytest.raises(DefaultsError) as e:
        read_defaults(tmp_path)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = subprocess.run([sys.executable, "-m", "models", "predict", "--magnification", "100X", "--root", str(tmp_path),
                        "x.png"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_the_shipped_routing_file_is_valid():
    assert set(read_defaults(ROOT / "magnif_models")) == {"40X", "100X", "200X", "400X", "idc", "subtype"}


def test_one_registry_serves_builders_and_clis():
    from models.archs import ArchSpec, arch_spec, build_model, get_arch, list_archs, register_arch

    names = list_archs()
    assert {"efficientnet_lite2", "resnet50", "densenet121", "efficientnet_v2_s", "hybrid", "tiles"} <= set(names)
    assert "hybrid" not in list_archs(backbones_only=True)
    assert arch_spec("hybrid").input_size == get_arch("efficientnet_lite2").input_size
    assert arch_spec("tiles").input_size == (230, 233)
    with pytest.raises(ValueError, match="already registered"):
        register_arch(ArchSpec("resnet50", 1, "x", (0, 0, 0), (1, 1, 1), (8, 8)))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("no_such_net")
    r = subprocess.run([sys.executable, "-m", "training", "train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "efficientnet_v2_s" in r.stdout and "hybrid" in r.stdout  # the CLI's choices come from the registry


def test_weight_location_comes_from_the_environment(monkeypatch, tmp_path):
    from models import config

    monkeypatch.setenv("BREAKHIS_LITE2_WEIGHTS", str(tmp_path / "w.safetensors"))
    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(tmp_path / "models"))
    assert config.lite2_weights() == tmp_path / "w.safetensors"
    assert config.models_root() == tmp_path / "models"
    monkeypatch.delenv("BREAKHIS_LITE2_WEIGHTS")
    monkeypatch.setenv("BREAKHIS_SHARED", str(tmp_path))
    assert config.lite2_weights() == tmp_path / "weights" / "efficientnet_lite2_in1k.safetensors"


# Layering: pages -> app -> models; training -> models; nothing upward or sideways. Scripts and benchmarks may use
# models, training and app, never the pages.
FORBIDDEN = {"models": {"training", "app", "pages", "streamlit"}, "training": {"app", "pages", "streamlit"},
             "app": {"training", "pages"}, "scripts": {"pages"}, "benchmarks": {"pages"}}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_imports_stay_layered():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for f in sorted((ROOT / pkg).rglob("*.py")):  # sub-packages (models/engine, models/routing) too
            hit = _imports(f) & forbidden
            if hit:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad
    assert not (ROOT / "models" / "dashboard.py").exists()  # the UI helpers live in app/


def test_feature_cache_is_keyed_by_the_network_and_the_frames(tmp_path):
    """Features come from the network given: two scratch networks never share them; identical weights reuse them."""
    import torch

    from models.archs import build_model
    from models.card import PreprocessConfig
    from training.engine import cached_features

    cfg = PreprocessConfig(input_size=(32, 48), mean=(0.5,) * 3, std=(0.5,) * 3)
    images = torch.randint(0, 255, (3, 3, 32, 48), dtype=torch.uint8)
    torch.manual_seed(1)
    a = build_model("resnet50", "scratch")[0]
    torch.manual_seed(2)
    b = build_model("resnet50", "scratch")[0]
    fa, fb = cached_features(a, images, cfg, tmp_path), cached_features(b, images, cfg, tmp_path)
    assert not np.allclose(fa, fb)
    torch.manual_seed(1)
    a2 = build_model("resnet50", "scratch")[0]
    assert np.array_equal(cached_features(a2, images, cfg, tmp_path), fa)
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2
    other = images.clone()
    other[0, 0, 0, 0] ^= 1  # one pixel of one frame: a new key
    cached_features(a, other, cfg, tmp_path)
    assert len(list((tmp_path / "features").glob("*.npy"))) == 3


def test_one_early_stopper_keeps_the_best_state_and_counts_stale_epochs():
    import torch

    from training.engine import EarlyStopper

    net = torch.nn.Linear(1, 1)
    y = np.array([0, 0, 1, 1])
    st = EarlyStopper(y)
    good, tie_worse_loss, bad = np.array([-2., -1, 1, 2]), np.array([-.1, -.05, .05, .1]), np.array([2., 1, -1, -2])
    with torch.no_grad():
        net.weight.fill_(1.0)
    assert st.step(net, "full", 1, 0.5, lambda: good)
    with torch.no_grad():
        net.weight.fill_(2.0)
    assert not st.step(net, "full", 2, 0.4, lambda: tie_worse_loss)  # same AUC, higher loss: not better
    assert not st.step(net, "full", 3, 0.3, lambda: bad)
    assert st.stale == 2 and st.best.best_epoch == 1 and float(st.best.state["weight"]) == 1.0
    assert [e["val_auc"] for e in st.logs] == [1.0, 1.0, 0.0]
    with torch.no_grad():
        net.weight.fill_(3.0)
    assert st.step(net, "full", 4, 0.2, lambda: 3 * good)  # same AUC, lower validation loss: the tie goes to it
    assert st.stale == 0 and st.best.best_epoch == 4 and float(st.best.state["weight"]) == 3.0
    fixed = EarlyStopper(np.array([], int))  # refit on every patient: fixed schedule, last state wins
    assert fixed.step(net, "full", 1, 0.5, lambda: 1 / 0) and fixed.step(net, "full", 2, 0.4, lambda: 1 / 0)
    assert fixed.best.best_epoch == 2
