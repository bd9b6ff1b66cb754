"""`card.json`: a model folder that describes itself (Model Cards for Model Reporting; MONAI bundle metadata).

One typed, versioned schema. The preprocessing config travels with the weights (like timm's `pretrained_cfg`), so
inference can never drift from training. Loading validates value ranges (pydantic, over these stdlib dataclasses,
so the rest of the code keeps plain attribute access), refuses unknown fields and migrates older `card_version`s;
`card_schema()` is the JSON Schema exported as `magnif_models/card.schema.json`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

CARD_VERSION = 3
# What the model answers: benign/malignant frames, IDC-positive patches, or the eight BreakHis subtypes of a frame.
TASK_KINDS = ("malignancy", "idc", "subtype")
# One magnification type for the whole code base: the four BreakHis objectives, and ALL for pooled models.
MAGNIFICATIONS: tuple[str, ...] = ("40X", "100X", "200X", "400X")
ALL = "all"
Magnification = Literal["40X", "100X", "200X", "400X", "all"]
# Temperatures outside these bounds are fits gone wrong (models.metrics guards the fit with the same bounds); a card
# carrying one is refused rather than served. A threshold near 0 or 1 turns every frame into one class.
TEMPERATURE_BOUNDS = (0.05, 20.0)
THRESHOLD_BOUNDS = (0.05, 0.95)
MAX_INPUT_SIDE = 1024  # pixels per side of the network input: larger is a typo or an attack on memory

_FORBID = ConfigDict(extra="forbid")
_Side = Annotated[int, Field(ge=16, le=MAX_INPUT_SIDE)]
_Unit = Annotated[float, Field(ge=0.0, le=1.0)]
_Std = Annotated[float, Field(gt=0.0, le=10.0)]


class CardError(ValueError):
    """A card that cannot be trusted: the message is one line naming the file and every problem."""


@with_config(_FORBID)
@dataclass
class PreprocessConfig:
    """How a frame becomes a tensor: the whole frame resized to (H, W); no crop drops tissue."""

    input_size: tuple[_Side, _Side]
    mean: tuple[_Unit, _Unit, _Unit]
    std: tuple[_Std, _Std, _Std]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
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
        return TypeAdapter(cls).validate_python(d)


@dataclass(frozen=True)
class Metric:
    """One figure with its 95% patient-bootstrap CI, as `models.metrics.summarize` writes it."""

    value: float
    ci95: tuple[float, float]

    def fmt(self, digits: int = 3) -> str:
        lo, hi = self.ci95
        if self.value is None or not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} ({lo:.{digits - 1}f}-{hi:.{digits - 1}f})"


def metric(summary: dict | None, name: str = "auc") -> Metric | None:
    """The one place that reads a metric out of a summary dict; None when the summary or the metric is absent."""
    m = (summary or {}).get("metrics", {}).get(name)
    if m is None:
        return None
    v = m.get("value")
    return Metric(float("nan") if v is None else float(v), tuple(m.get("ci95") or (float("nan"), float("nan"))))


def io_format(pre: PreprocessConfig, task_kind: str = "malignancy", classes: list | None = None) -> tuple[dict, dict]:
    """What the network reads and returns, derived from the preprocessing and task so they can never disagree."""
    h, w = pre.input_size
    tiles = pre.tiles
    n = (tiles or {}).get("grid", [1, 1])
    inp = {"dtype": "float32", "channel_order": "RGB", "layout": "NCHW",
           "shape": ["B", 3, h, w] if not tiles else ["B", n[0] * n[1], 3, h, w],
           "value_range": f"RGB scaled to {list(pre.value_range)}, then (x - mean) / std per channel",
           "source": "a BreakHis-style 700x460 H&E frame" + (", cut into native-resolution tiles" if tiles else
                                                               f", resized to {w}x{h}")}
    if task_kind == "subtype":
        k = len(classes or [])
        out = {"dtype": "float32", "shape": ["B", k], "kind": "log_probability",
               "probability": "p_subtype = exp(output); the rows sum to 1 over arch_config.classes, in that order",
               "classes": list(classes or [])}
        return inp, out
    out = {"dtype": "float32", "shape": ["B"], "kind": "logit",
           "probability": "p_malignant = sigmoid(logit / temperature)", "positive_class": "malignant (1)"}
    return inp, out


@with_config(_FORBID)
@dataclass
class MagnificationCalibration:
    """One magnification's own temperature, with where it came from."""

    temperature: Annotated[float, Field(ge=TEMPERATURE_BOUNDS[0], le=TEMPERATURE_BOUNDS[1])]
    source: str
    n_patients: dict = field(default_factory=dict)

    def __getitem__(self, key: str):  # read like the JSON it came from
        return getattr(self, key)


@with_config(_FORBID)
@dataclass
class ModelCard:
    model_id: str
    architecture: str
    magnification: Magnification
    preprocess: PreprocessConfig
    init: dict
    arch_config: dict = field(default_factory=dict)  # builder options (the hybrid's branches and sizes)
    task: str = "binary classification of H&E breast histopathology frames: benign (0) vs malignant (1)"
    output: str = "one logit; p_malignant = sigmoid(logit / temperature)"
    input_format: dict = field(default_factory=dict)  # derived from preprocess (io_format); checked on load
    output_format: dict = field(default_factory=dict)
    temperature: Annotated[float, Field(ge=TEMPERATURE_BOUNDS[0], le=TEMPERATURE_BOUNDS[1])] = 1.0
    threshold: Annotated[float, Field(ge=THRESHOLD_BOUNDS[0], le=THRESHOLD_BOUNDS[1])] = 0.5
    # A pooled model's calibration per magnification (issue 25): {"40X": {"temperature": T, "source": why}}; a
    # magnification absent here uses `temperature` (fewer than 5 out-of-fold patients per class there).
    temperature_by_magnification: dict[Literal["40X", "100X", "200X", "400X"], "MagnificationCalibration"] = \
        field(default_factory=dict)
    weights_file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "model.safetensors"
    weights_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    weights_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    recipe: dict = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # provenance: source, images/patients per split and class
    split_file: str = "split.csv"
    evaluation: dict = field(default_factory=dict)  # protocol + metrics with 95% CIs
    per_magnification: dict[Magnification, dict] = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    training_log: list = field(default_factory=list)
    training_time_s: Annotated[float, Field(ge=0)] = 0.0
    versions: dict = field(default_factory=dict)
    git_commit: str = ""
    created: str = ""
    intended_use: str = (
        "Research aid for computational-pathology researchers and pathologists exploring BreakHis-style "
        "frames. Not a diagnosis; not validated for clinical use."
    )
    limitations: list[str] = field(default_factory=list)
    changelog: list[str] = field(default_factory=list)
    task_kind: Literal["malignancy", "idc", "subtype"] = "malignancy"  # card_version 3 ("subtype" added, readable by v3)
    card_version: Literal[3] = CARD_VERSION

    def __post_init__(self) -> None:
        if self.task_kind == "subtype" and not (self.arch_config or {}).get("classes"):
            raise ValueError("a subtype card names its classes in arch_config.classes")
        inp, out = io_format(self.preprocess, self.task_kind, (self.arch_config or {}).get("classes"))
        if self.input_format and self.input_format != inp:
            raise ValueError(f"input_format {self.input_format} disagrees with preprocess (expected {inp})")
        if self.output_format and self.output_format != out:
            raise ValueError(f"output_format disagrees with this card's task ({self.task_kind}): expected {out}")
        self.input_format, self.output_format = inp, out

    def summary_at(self, magnification: str) -> dict | None:
        """Out-of-fold summary at one magnification: its own figures, a pooled model's per-magnification figures,
        or another magnification's model's cross-magnification check; None where it has none."""
        if self.magnification == magnification:
            return self.evaluation.get("overall")
        if self.magnification == ALL:
            return self.per_magnification.get(magnification)
        return self.evaluation.get("cross_magnification", {}).get(magnification)

    def summaries_at(self, magnification: str) -> tuple[dict, dict | None]:
        """(plain, 8-view TTA or None) out-of-fold summaries at one magnification, chosen as `summary_at` chooses."""
        plain = self.summary_at(magnification)
        if plain is None:
            raise KeyError(f"{self.model_id} has no out-of-fold figures at {magnification}")
        tta = self.evaluation.get("tta") or {}
        if self.magnification == ALL and magnification != ALL:
            return plain, tta.get("per_magnification", {}).get(magnification)
        if self.magnification == magnification:
            return plain, tta.get("overall")
        return plain, plain.get("tta")

    def metric_at(self, magnification: str, name: str = "auc") -> Metric | None:
        return metric(self.summary_at(magnification), name)

    @property
    def overall(self) -> dict:
        """The card's own out-of-fold summary (all its frames)."""
        return self.evaluation.get("overall") or {}

    def to_dict(self) -> dict:
        """JSON-ready dict; the input/output format is derived afresh (preprocess may have been edited in code)."""
        self.input_format, self.output_format = io_format(self.preprocess, self.task_kind,
                                                          (self.arch_config or {}).get("classes"))
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def to_json(self, path: str | Path) -> None:
        """Write the card; it is validated first, so training can never write a card that loading refuses."""
        d = self.to_dict()
        validate_card_dict(d, str(path))
        Path(path).write_text(json.dumps(d, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        """Read, migrate and validate a card; any problem is one `CardError` line."""
        try:
            d = json.loads(Path(path).read_text())
        except OSError as exc:
            raise CardError(f"{path}: cannot read the card ({exc.strerror or exc})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CardError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:  # e.g. 200,000 nested brackets: refused as one line, the other models still shown
            raise CardError(f"{path}: JSON nested too deeply to be a card") from None
        try:
            return validate_card_dict(migrate_card(d, str(path)), str(path))
        except RecursionError:
            raise CardError(f"{path}: JSON nested too deeply to be a card") from None


def migrate_card(d: Any, where: str = "card.json") -> dict:
    """Bring an older card up to CARD_VERSION (weights untouched); refuse a newer one."""
    if not isinstance(d, dict):
        raise CardError(f"{where}: a card is a JSON object, not {type(d).__name__}")
    v = d.get("card_version", 1)
    if not isinstance(v, int) or v < 1:
        raise CardError(f"{where}: card_version {v!r} is not a version number")
    if v > CARD_VERSION:
        raise CardError(f"{where}: card_version {v} is newer than this software reads ({CARD_VERSION}); upgrade it")
    d = dict(d)
    if v == 1:
        # v1 -> v2: `serves` (routing written back into cards) is gone: routing lives in defaults.json only.
        # The input/output format is now spelled out (derived from preprocess on load).
        serves = d.pop("serves", {})
        if serves:
            raise CardError(f"{where}: a v1 card with routing in `serves` cannot be migrated silently; "
                            "re-run `python -m training select-defaults`")
        d["changelog"] = [*d.get("changelog", []), f"{date.today().isoformat()}: migrated from card_version 1 to 2 "
                          "(`serves` removed: routing lives in defaults.json; input/output format added); weights unchanged"]
        d["card_version"] = v = 2
    if v == 2:
        # v2 -> v3: `task_kind` says what the model answers (IDC patch models joined the frame models); every v2
        # card is a benign/malignant frame model. Migrated in memory: the file (and its sha256) is left as it is.
        d["task_kind"] = "malignancy"
        d["card_version"] = 3
    return d


def validate_card_dict(d: dict, where: str = "card.json") -> ModelCard:
    """Validate a (migrated) card dict against the schema; all problems in one line."""
    try:
        return TypeAdapter(ModelCard).validate_python(d)
    except ValidationError as exc:
        probs = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "card"
            got = e.get("input")
            got = f" (got {json.dumps(got, default=str)[:40]})" if not isinstance(got, (dict, list)) else ""
            msg = ("unknown field (not in card_version %d; refused rather than dropped)" % CARD_VERSION
                   if e["type"] == "unexpected_keyword_argument" else e["msg"][0].lower() + e["msg"][1:])
            probs.append(f"{loc}: {msg}{got}")
        raise CardError(f"{where}: invalid card: " + "; ".join(probs)) from None


def card_schema() -> dict:
    """The card's JSON Schema (what `magnif_models/card.schema.json` holds)."""
    schema = TypeAdapter(ModelCard).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "card.schema.json",
            **schema, "title": f"BreakHis dashboard model card (card_version {CARD_VERSION})"}


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
