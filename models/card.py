"""`card.json`: a model folder that describes itself (Model Cards for Model Reporting; MONAI bundle metadata).

The preprocessing config travels with the weights (like timm's `pretrained_cfg`), so inference can
never drift from training.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CARD_VERSION = 1


@dataclass
class PreprocessConfig:
    """How a frame becomes a tensor: the whole frame resized to (H, W); no crop drops tissue."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)  # RGB scaled to this range before mean/std
    crop: str = "none (full frame resized; aspect 700:460 kept by the chosen size)"
    # Stain normalisation applied to the resized uint8 frame (models.stain): None, or the method with the
    # target statistics fitted on the training frames, e.g. {"method": "reinhard", "target_means": [...], ...}.
    stain: dict | None = None
    # Native-resolution tiling (models.tiles) instead of resizing the frame: None, or
    # {"grid": [2, 3], "tile_size": [230, 233], "reference_size": [700, 460]}; input_size is then the tile size.
    tiles: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        for k in ("input_size", "mean", "std", "value_range"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


@dataclass
class ModelCard:
    model_id: str
    architecture: str
    magnification: str  # '40X' | '100X' | '200X' | '400X' | 'all'
    preprocess: PreprocessConfig
    init: dict
    arch_config: dict = field(default_factory=dict)  # builder options (the hybrid's branches and sizes)
    task: str = "binary classification of H&E breast histopathology frames: benign (0) vs malignant (1)"
    output: str = "one logit; p_malignant = sigmoid(logit / temperature)"
    temperature: float = 1.0
    threshold: float = 0.5
    weights_file: str = "model.safetensors"
    weights_sha256: str = ""
    weights_dtype: str = "float16"
    recipe: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # provenance: source, images/patients per split and class
    split_file: str = "split.csv"
    evaluation: dict = field(default_factory=dict)  # protocol + metrics with 95% CIs
    per_magnification: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    training_log: list = field(default_factory=list)
    training_time_s: float = 0.0
    versions: dict = field(default_factory=dict)
    git_commit: str = ""
    created: str = ""
    intended_use: str = (
        "Research aid for computational-pathology researchers and pathologists exploring BreakHis-style "
        "frames. Not a diagnosis; not validated for clinical use."
    )
    serves: dict = field(default_factory=dict)  # deprecated, kept empty: routing and its reasons live in defaults.json
    limitations: list = field(default_factory=list)
    changelog: list = field(default_factory=list)
    card_version: int = CARD_VERSION

    def summary_at(self, magnification: str) -> dict | None:
        """Out-of-fold summary at one magnification: its own figures, a pooled model's per-magnification figures,
        or another magnification's model's cross-magnification check; None where it has none."""
        if self.magnification == magnification:
            return self.evaluation.get("overall")
        if self.magnification == "all":
            return self.per_magnification.get(magnification)
        return self.evaluation.get("cross_magnification", {}).get(magnification)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, default=_jsonable) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        d: dict[str, Any] = json.loads(Path(path).read_text())
        d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
