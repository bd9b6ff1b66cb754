from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BREAKHIS_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data" / "breakhis"
FRAMES = SHARED / "data" / "breakhis_frames"
LITE2 = SHARED / "weights" / "efficientnet_lite2_in1k.safetensors"

needs_shared = pytest.mark.skipif(not DATA.is_dir() or not LITE2.is_file(),
                                  reason="../shared (BreakHis sample and Lite2 weights) is absent")

CODES = {"adenosis": "A", "fibroadenoma": "F", "phyllodes_tumor": "PT", "tubular_adenoma": "TA",
         "ductal_carcinoma": "DC", "lobular_carcinoma": "LC", "mucinous_carcinoma": "MC", "papillary_carcinoma": "PC"}


def build_official_tree(dest: Path, magnification: str = "100X", per_label: int = 3, per_patient: int = 4) -> Path:
    """Official BreakHis layout (PNG) from ../shared/data, a few patients per label."""
    man = pd.read_csv(DATA / "manifest.csv", dtype=str)
    man = man[man["magnification"] == magnification]
    root = dest / "BreaKHis_v1" / "histology_slides" / "breast"
    for label in ("benign", "malignant"):
        pats = sorted(man.loc[man["label"] == label, "patient"].unique())[:per_label]
        for pat in pats:
            for r in man[man["patient"] == pat].head(per_patient).to_dict("records"):
                stem = Path(r["path"]).stem
                folder = (root / label / "SOB" / r["subtype"] / f"SOB_{label[0].upper()}_{CODES[r['subtype']]}-{stem.split('-')[1]}-{r['slide']}"
                          / magnification)
                folder.mkdir(parents=True, exist_ok=True)
                Image.open(DATA / r["path"]).convert("RGB").save(folder / f"{stem}.png")
    return dest / "BreaKHis_v1"


@pytest.fixture(scope="session")
def official_archive(tmp_path_factory) -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is absent")
    d = tmp_path_factory.mktemp("official")
    tree = build_official_tree(d / "src")
    archive = d / "BreaKHis_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="BreaKHis_v1")
    return archive


def make_model_folder(out: Path, arch: str, magnification: str, per_mag: list[str] | None = None, seed: int = 0,
                      signal: float = 0.3) -> Path:
    """A scratch model folder with a complete card whose metrics come from synthetic out-of-fold predictions."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from models.archs import arch_spec, build_model, file_sha256, hybrid_config
    from models.card import ModelCard, PreprocessConfig
    from models.metrics import curve_points, summarize

    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # deterministic fixture weights
    model, rec = build_model(arch, "scratch")
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    rng = np.random.default_rng(seed)
    pats = np.repeat(np.arange(24), 5).astype(str)
    y = (np.arange(24).repeat(5) % 3 != 0).astype(int)
    mags = np.array((per_mag or [magnification]) * 200)[: len(y)]
    p = np.clip(signal * y + (1 - signal) * rng.random(len(y)), 0, 1)
    s = summarize(y, p, pats, n_boot=50)
    spec = arch_spec(arch)
    card = ModelCard(model_id=f"{out.parent.name}/{out.name}", architecture=arch, magnification=magnification,
                     preprocess=PreprocessConfig(spec.input_size, spec.mean, spec.std), init=rec,
                     arch_config=hybrid_config() if arch == "hybrid" else {},
                     weights_sha256=file_sha256(out / "model.safetensors"),
                     evaluation={"protocol": "synthetic test fixture", "overall": s, "per_fold": []},
                     per_magnification={m: summarize(y[mags == m], p[mags == m], pats[mags == m], n_boot=20) for m in (per_mag or [])},
                     baseline={"description": "fixture baseline", "overall": s},
                     data={"all": {"benign": {"images": 40, "patients": 8}, "malignant": {"images": 80, "patients": 16}}},
                     training_log=[{"phase": "head", "epoch": 5, "train_loss": 0.5, "val_auc": 0.7, "val_loss": 0.6}])
    if arch == "hybrid":  # what a phased run records: per-phase schedule and validation AUC, TTA figures
        card.recipe = {"name": "phased (hybrid)", "phases_per_fold": [[
            {"phase": "1: ViT + fusion + head (CNN frozen)", "max_epochs": 30, "lr": 3e-4, "best_epoch": 12, "best_val_auc": 0.7},
            {"phase": "2: last CNN stages + ViT + fusion + head", "max_epochs": 2, "lr_cnn": 1e-4, "lr_rest": 1e-4,
             "best_epoch": 1, "best_val_auc": 0.72}]]}
        card.evaluation["tta"] = {"overall": s, "per_magnification": dict(card.per_magnification)}
    card.to_json(out / "card.json")
    (out / "curves.json").write_text(json.dumps({"overall": curve_points(y, p), "per_magnification": {
        m: curve_points(y[mags == m], p[mags == m]) for m in (per_mag or [])}}))
    import pandas as pd

    pd.DataFrame({"path": [f"f{i}.png" for i in range(len(y))], "patient": pats, "label": y, "magnification": mags,
                  "p_malignant": p}).to_csv(out / "predictions.csv", index=False)
    return out


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """A models root with a 100X model, a pooled ResNet covering 40X/100X/200X and a weak pooled hybrid covering
    40X/100X (nothing for 400X)."""
    from models.routing.rule import select_defaults

    root = tmp_path_factory.mktemp("magnif_models")
    make_model_folder(root / "100X" / "efficientnet_lite2", "efficientnet_lite2", "100X", seed=1, signal=0.6)
    make_model_folder(root / "all" / "resnet50", "resnet50", "all", per_mag=["40X", "100X", "200X"], seed=2)
    make_model_folder(root / "all" / "hybrid", "hybrid", "all", per_mag=["40X", "100X"], seed=3, signal=0.05)
    make_idc_folder(root / "idc" / "efficientnet_lite2_idc")
    make_subtype_folder(root / "subtype" / "efficientnet_lite2_subtype")
    select_defaults(root)
    return root


def make_subtype_folder(out: Path) -> Path:
    """A scratch hierarchical subtype model (tiles, mean pooling) whose card carries a subtype CV on synthetic
    features (24 patients, three per subtype)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from models.archs import build_model, file_sha256
    from models.card import ModelCard
    from models.subtype import SUBTYPES
    from training.frozen_cv import tile_preprocess_config
    from training.subtypes import subtype_cv

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(5)
    cfg = {"backbone": "efficientnet_lite2", "pooling": "mean", "subtype_head": "hierarchical", "classes": list(SUBTYPES)}
    model, rec = build_model("tiles", "scratch", cfg)
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    rng = np.random.default_rng(0)
    rows = [{"patient": f"{s}{p}", "subtype": s} for s in SUBTYPES for p in range(3) for _ in range(4)]
    x = np.array([rng.normal(0.5 * SUBTYPES.index(r["subtype"]), 1.0, 8) for r in rows])
    cv = subtype_cv(pd.DataFrame(rows), x, split_seeds=(0,), k=3, n_boot=20)
    card = ModelCard(model_id=f"subtype/{out.name}", architecture="tiles", magnification="all",
                     preprocess=tile_preprocess_config(), arch_config=cfg, task_kind="subtype", init=rec,
                     weights_sha256=file_sha256(out / "model.safetensors"), data={"patients": 24},
                     evaluation={"protocol": cv["protocol"], "strategy": "hierarchical", "subtype_cv": cv})
    card.to_json(out / "card.json")
    return out


def make_idc_folder(out: Path) -> Path:
    """A scratch IDC patch model (a frame-model fixture re-labelled as task_kind idc, 64x64 input for speed)."""
    from models.card import ModelCard, PreprocessConfig

    make_model_folder(out, "efficientnet_lite2", "40X", seed=4, signal=0.6)
    card = ModelCard.from_json(out / "card.json")
    card.task_kind = "idc"
    card.task = "fixture: IDC-negative (0) vs IDC-positive (1) patches"
    card.preprocess = PreprocessConfig((64, 64), card.preprocess.mean, card.preprocess.std, interpolation="bicubic")
    card.input_format, card.output_format = {}, {}
    card.data = {"patients": 24}
    card.to_json(out / "card.json")
    return out
