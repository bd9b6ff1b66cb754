"""Typed evidence with machine keys: the refer policy's out-of-distribution audit, a model's rule-1 result, and the
pointers from a model folder to its evidence files (`evidence.json` beside `card.json`).

The pointers live beside the card, not in it: a card's sha256 is what routing and the refer policy are checked
against, so adding a pointer must not invalidate them. Every pointer is validated on load and a test checks that
each shipped pointer resolves (tests/test_evidence.py)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

EVIDENCE_FILE = "evidence.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OodCounts(_Strict):
    held_out: int = 0
    generated: int = 0
    idc: int = 0
    qc_failures: int = 0


class OodRates(_Strict):
    generated: float | None = None
    idc: float | None = None
    held_out: float | None = None


class OodAudit(_Strict):
    """How well the OOD score separates held-out training frames from what must be referred (refer.json)."""

    generated_auroc: float | None = None  # generated non-histology
    generated_referred_by_kind: dict[str, float] = Field(default_factory=dict)
    idc_auroc: float | None = None  # IDC patches: other-scale histology
    qc_failures_auroc: float | None = None  # training frames that fail QC
    n: OodCounts = Field(default_factory=OodCounts)
    referred_by_rule: OodRates = Field(default_factory=OodRates)  # by QC or the OOD score: the decision rule
    referred_at_threshold: OodRates = Field(default_factory=OodRates)  # by the OOD threshold alone


# refer.json files written before the audit was typed used English sentences as keys; read them once, here.
_LEGACY = {"generated non-histology": "generated_auroc", "generated referred, by kind": "generated_referred_by_kind",
           "IDC patches (other-scale histology)": "idc_auroc", "QC failures among training frames": "qc_failures_auroc",
           "referred by QC or the OOD score (the decision rule)": "referred_by_rule",
           "referred at the threshold": "referred_at_threshold"}
_LEGACY_INNER = {"held-out training frames": "held_out", "IDC patches": "idc", "QC failures": "qc_failures"}


def ood_audit(d: dict | None) -> OodAudit:
    """The typed audit from a refer.json's `ood_auroc` (machine keys, or the older sentence keys)."""
    d = dict(d or {})
    out = {}
    for k, v in d.items():
        key = _LEGACY.get(k, k)
        if isinstance(v, dict) and key in ("n", "referred_by_rule", "referred_at_threshold"):
            v = {_LEGACY_INNER.get(a, a): b for a, b in v.items()}
        out[key] = v
    return OodAudit.model_validate(out)


class Rule1Pointer(_Strict):
    """Where a model's recipe is measured under rule 1 (3 split seeds x 5 folds), in the results folder."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.json$")  # a file name inside benchmarks/results
    recipe: str | None = None  # a key of the file's "recipes" (frozen-cv files hold several), or None
    shortfall: str = ""  # why fewer than 3 split seeds ran, said beside the figure wherever it is shown


class ModelEvidence(_Strict):
    """A model folder's pointers to the evidence behind its figures."""

    rule1: Rule1Pointer | None = None


class Rule1Figure(BaseModel):
    """The part of a rule-1 result the pages and tables read."""

    model_config = ConfigDict(extra="allow")
    summary: dict
    pooled_auc_by_seed: list[float] | dict
    per_fold_auc_mean: float
    per_fold_auc_sd: float
    n_patients: dict | int


class EvidenceError(ValueError):
    """An evidence file or pointer that cannot be trusted; the message is one line."""


def load_evidence(folder: str | Path) -> ModelEvidence:
    """The folder's evidence pointers (none when it has no evidence.json); refused with one line when invalid."""
    path = Path(folder) / EVIDENCE_FILE
    if not path.is_file():
        return ModelEvidence()
    try:
        return ModelEvidence.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, RecursionError, ValidationError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvidenceError(f"{path}: invalid evidence pointers: {msg}") from None


def rule1_figure(pointer: Rule1Pointer, results_dir: str | Path) -> Rule1Figure:
    """The rule-1 result a pointer names, typed; EvidenceError when the file or the recipe is missing."""
    path = Path(results_dir) / pointer.file
    try:
        res = json.loads(path.read_text())
        block = res["recipes"][pointer.recipe] if pointer.recipe else res["recipe"]
        return Rule1Figure.model_validate(block)
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise EvidenceError(f"{path}: rule-1 evidence unreadable ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
