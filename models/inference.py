"""Load a model folder (verifying its sha256 first), route magnifications, predict on images or files."""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

from models.archs import HistoClassifier, build_model, file_sha256
from models.card import ALL, MAGNIFICATIONS, TASK_KINDS, ModelCard
from models.config import models_root
from models.metrics import apply_temperature
from models.preprocess import ImageError, frame_to_tensor, load_image
from models.quality import check_quality, qc_failures
from models.refer import Decision, ReferPolicy, decide, embed, ood_score_of

DEFAULTS_FILE = "defaults.json"


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of a model shared between sessions. Prediction and Grad-CAM both take it: Grad-CAM's hooks on a
    layer record whatever passes through it, so a prediction running beside a heatmap would hand the heatmap its
    activations (re-entrant: a heatmap may predict inside)."""
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = threading.RLock()
        return _LOCKS[model]


class ModelIntegrityError(RuntimeError):
    """The weights on disk are not the ones the card vouches for."""


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a (B,3,H,W) batch: 4 quarter turns of the frame and of its mirror image."""
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def tta_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Mean logit over the 8 dihedral views (test-time augmentation), float64."""
    return np.mean([model(v).double().cpu().numpy() for v in dihedral_views(x)], axis=0)


@dataclass
class LoadedModel:
    card: ModelCard
    model: HistoClassifier
    folder: Path
    policy: ReferPolicy | None = None  # refer-when-unsure policy (refer.json), when fitted for this very card
    policy_note: str = ""  # why there is no policy (none fitted, fitted for another card, unreadable)
    card_sha256: str = ""  # of card.json as loaded: hashed once here, reused by the policy check and every export

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def case_policy(self):
        """The case-level policy fitted with this model's refer policy (models.case.CasePolicy), or None."""
        from models.case import CasePolicy

        return CasePolicy.from_dict(self.policy.case_policy) if self.policy is not None else None

    def temperature_for(self, magnification: str | None = None) -> float:
        """The calibration temperature at a magnification: the card's own for it where it was fitted on enough
        out-of-fold patients (card.temperature_by_magnification), else the pooled one."""
        entry = (self.card.temperature_by_magnification or {}).get(magnification or "")
        return float(entry["temperature"]) if entry else self.card.temperature

    def calibration_note(self, magnification: str | None = None) -> str:
        """Which temperature applies at this magnification, and why (the Diagnose page says it)."""
        entry = (self.card.temperature_by_magnification or {}).get(magnification or "")
        if entry:
            return f"temperature {entry['temperature']:.2f} fitted for {magnification} ({entry['source']})"
        if self.card.temperature_by_magnification:
            return f"pooled temperature {self.card.temperature:.2f} (no per-magnification fit for {magnification})"
        return f"temperature {self.card.temperature:.2f} (one for every magnification)"

    def decide(self, img: Image.Image, p: float, qc, ood_score: float | None = None) -> Decision:
        """benign | malignant | refer, with the reason (models.refer); the OOD distance is computed if not given."""
        if ood_score is None:
            ood_score = ood_score_of(self, img)
        return decide(p, self.card.threshold, qc_failures(qc), qc.out_of_distribution, ood_score, self.policy,
                      self.policy_note)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        """Raw logits for a preprocessed (B,3,H,W) batch, fp32 so evaluate and predict agree exactly.

        tta=True averages the logits of the 8 dihedral views (4 quarter turns x horizontal flip).
        """
        x = batch.float()
        with model_lock(self.model):
            return tta_logits(self.model, x) if tta else self.model(x).double().numpy()

    def probabilities(self, batch: torch.Tensor, tta: bool = False, magnification: str | None = None) -> np.ndarray:
        """Calibrated p(malignant) for a preprocessed batch (the magnification's temperature where the card has one)."""
        return apply_temperature(self.logits(batch, tta), self.temperature_for(magnification))

    def preprocess(self, img: Image.Image, notes: list[str] | None = None) -> torch.Tensor:
        return frame_to_tensor(img, self.card.preprocess, notes)

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 16, tta: bool = False,
                       notes: Sequence[list[str]] | None = None, embeddings: list | None = None,
                       magnification: str | None = None) -> np.ndarray:
        """Calibrated p(malignant) for RGB PIL frames; preprocessing notes (stain failures) go to notes[i].

        With `embeddings` (a list to fill) and a referral policy, each frame's OOD distance is appended too; for a
        plain classifier it comes from the same forward pass as the logit (the head reads the pooled features)."""
        notes = notes if notes is not None else [[] for _ in images]
        if self.card.preprocess.tiles:
            batch_size = 1  # frames of unusual size give other tile counts: one bag at a time
        want_ood = embeddings is not None and self.policy is not None and self.policy.ood is not None
        one_pass = want_ood and not tta and hasattr(self.model, "logit_and_features")
        temperature = self.temperature_for(magnification)
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im, n) for im, n in zip(images[i:i + batch_size], notes[i:i + batch_size])])
            if one_pass:
                with model_lock(self.model), torch.inference_mode():
                    z, f = self.model.logit_and_features(x.float())
                out.append(apply_temperature(z.double().numpy(), temperature))
                embeddings.extend(self.policy.ood.score(f.double().numpy()))
                continue
            out.append(self.probabilities(x, tta, magnification))
            if want_ood:
                with model_lock(self.model):
                    embeddings.extend(self.policy.ood.score(embed(self.model, x.float())))
        return np.concatenate(out) if out else np.zeros(0)

    def label_for(self, p: float) -> str:
        return "malignant" if p >= self.card.threshold else "benign"

    def predict_files(self, paths: Iterable[str], magnification: str, batch_size: int = 16,
                      tta: bool = False, each: Callable[[dict, Image.Image], None] | None = None) -> list[dict]:
        """One result row per input, in order; a bad file gets an empty probability and its reason. `each(row, image)`
        runs once per decoded frame after its decision, so a caller adds to a row without decoding the file again."""
        rows: list[dict] = []
        pending: list[tuple[int, Image.Image, object]] = []

        def flush() -> None:
            notes: list[list[str]] = [[] for _ in pending]
            ood: list = []
            probs = self.predict_images([im for _, im, _ in pending], batch_size, tta, notes, ood, magnification)
            ood = ood or [None] * len(pending)
            for (i, im, q), p, n, o in zip(pending, probs, notes, ood):
                rows[i]["p_malignant"] = float(p)
                rows[i]["label"] = self.label_for(float(p))
                rows[i]["warning"] = "; ".join([w for w in [rows[i]["warning"], *n] if w])
                d = self.decide(im, float(p), q, o)
                rows[i]["decision"], rows[i]["reason"], rows[i]["decision_kind"] = d.decision, d.reason, d.kind
                if each is not None:
                    each(rows[i], im)
            pending.clear()

        for path in paths:
            row = {"path": path, "magnification": magnification, "model_id": self.model_id,
                   "p_malignant": None, "label": "", "decision": "refer", "reason": "", "warning": "",
                   "decision_kind": "unreadable"}
            rows.append(row)
            try:
                loaded = load_image(path, name=path)
            except ImageError as exc:
                row["warning"] = str(exc)
                row["reason"] = "the file could not be analysed"
                continue
            q = check_quality(loaded.image, magnification)
            row["warning"] = "; ".join(loaded.warnings + q.warnings)
            pending.append((len(rows) - 1, loaded.image, q))
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
        return rows


def load_model_folder(folder: str | Path, verify: bool = True) -> LoadedModel:
    """Build the card's architecture and load its weights, refusing weights whose sha256 differs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{folder}: no card.json; not a model folder")
    card = ModelCard.from_json(card_path)
    weights = folder / card.weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    members = (card.arch_config or {}).get("members") if card.architecture == "seed_ensemble" else None
    if verify and not members:  # an ensemble's files (weights_file is member 0) are each verified below, once
        digest = file_sha256(weights)
        if digest != card.weights_sha256:
            raise ModelIntegrityError(
                f"{weights}: sha256 {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…; "
                "refusing to load modified or corrupt weights")
    model, _ = build_model(card.architecture, "scratch", card.arch_config or None)  # weights: our own file below
    if members:
        # a seed ensemble: every member's file is verified against the sha256 the card lists for it, then loaded
        for i, m in enumerate(members):
            name = str(m.get("weights_file", ""))
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ModelIntegrityError(f"{folder}: member {i} names no plain weights file ({name!r})")
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: ensemble member {i} weights file missing")
            if verify and file_sha256(path) != m.get("weights_sha256"):
                raise ModelIntegrityError(f"{path}: sha256 does not match the card's for member {i}; refusing to load "
                                          "modified or corrupt weights")
            state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            model.members[i].load_state_dict(state, strict=True)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=True)
    model.eval()
    card_sha = file_sha256(card_path)
    return LoadedModel(card, model, folder, *load_policy(folder, card_sha), card_sha256=card_sha)


def load_policy(folder: Path, card_sha256: str) -> tuple[ReferPolicy | None, str]:
    """The refer policy fitted for this card, or None and why: a policy fitted for another version of the card, or
    one that cannot be read, is not used, and every decision then says so (never a silent fallback)."""
    try:
        pol = ReferPolicy.load(folder)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return None, f"the referral policy could not be read ({type(exc).__name__}): band and out-of-distribution " \
                     "checks not applied"
    if pol is None:
        return None, "no referral policy fitted for this model: band and out-of-distribution checks not applied"
    if pol.card_sha256 and pol.card_sha256 != card_sha256:
        return None, "the referral policy was fitted for another version of this card and is not used: band and " \
                     "out-of-distribution checks not applied"
    return pol, ""


IDC_DIR = "idc"  # IDC patch models live in <root>/idc/<name>/, beside the frame models' <MAG or all>/<name>/
SUBTYPE_DIR = "subtype"  # subtype models in <root>/subtype/<name>/ (never routed as benign/malignant models)
TASK_DIRS = {"idc": IDC_DIR, "subtype": SUBTYPE_DIR}


def list_model_folders(root: str | Path | None = None, task: str = "malignancy") -> list[Path]:
    """Every `<MAG or all>/<name>/card.json` folder under root (task "idc": every `idc/<name>/`, "subtype": every
    `subtype/<name>/`), sorted."""
    root = Path(root) if root else models_root()
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, not {task!r}")
    parents = (TASK_DIRS[task],) if task in TASK_DIRS else (*MAGNIFICATIONS, ALL)
    return sorted(p.parent for p in root.glob("*/*/card.json") if p.parent.parent.name in parents)


class DefaultsError(ValueError):
    """defaults.json cannot be trusted; the message is one line."""


@with_config(ConfigDict(extra="allow"))  # the routing evidence (comparisons, reason, ...) is free-form
@dataclass
class DefaultsEntry:
    """What serving needs from one magnification's routing entry; validated before anything reads it."""

    model_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+/[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    auc: Annotated[float, Field(ge=0.0, le=1.0)]
    n_patients: dict[Literal["benign", "malignant"], Annotated[int, Field(ge=0)]]
    card_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


@with_config(ConfigDict(extra="allow"))
@dataclass(kw_only=True)
class _TaskEntry:
    """What every single-model task's routing entry carries besides its model id and figure."""

    n_patients: Annotated[int, Field(ge=0)]
    card_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


@with_config(ConfigDict(extra="allow"))
@dataclass(kw_only=True)
class IdcDefaultsEntry(_TaskEntry):
    """The IDC patch model's routing entry (key "idc")."""

    model_id: Annotated[str, Field(pattern=r"^idc/[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    auc: Annotated[float, Field(ge=0.0, le=1.0)]


@with_config(ConfigDict(extra="allow"))
@dataclass(kw_only=True)
class SubtypeDefaultsEntry(_TaskEntry):
    """The subtype model's routing entry (key "subtype"): balanced accuracy over the testable classes."""

    model_id: Annotated[str, Field(pattern=r"^subtype/[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    balanced_accuracy: Annotated[float, Field(ge=0.0, le=1.0)]


_DEFAULTS = TypeAdapter(dict[Literal["40X", "100X", "200X", "400X"], DefaultsEntry])
_TASK_DEFAULTS = {IDC_DIR: TypeAdapter(IdcDefaultsEntry), SUBTYPE_DIR: TypeAdapter(SubtypeDefaultsEntry)}


def read_defaults(root: str | Path | None = None) -> dict:
    """The routing per magnification, as written by `python -m training select-defaults`, validated on load."""
    path = (Path(root) if root else models_root()) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DefaultsError(f"{path}: not valid JSON ({exc}); re-run `python -m training select-defaults`") from None
    try:
        if not isinstance(d, dict):
            raise DefaultsError(f"{path}: invalid routing file: top level: input should be a valid dictionary; re-run `python -m training "
                                "select-defaults`")
        _DEFAULTS.validate_python({k: v for k, v in d.items() if k not in _TASK_DEFAULTS})
        for key, adapter in _TASK_DEFAULTS.items():
            if key in d:
                adapter.validate_python(d[key])
    except ValidationError as exc:
        probs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg'][0].lower() + e['msg'][1:]}" for e in exc.errors()[:4])
        raise DefaultsError(f"{path}: invalid routing file: {probs}; re-run `python -m training select-defaults`") from None
    return d


def default_model_id(magnification: str, root: str | Path | None = None) -> str | None:
    """Model id serving `magnification` (or "idc" / "subtype": that task's model), or None when nothing serves it."""
    entry = read_defaults(root).get(magnification)
    return entry["model_id"] if entry else None
