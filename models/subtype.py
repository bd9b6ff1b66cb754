"""The eight BreakHis subtypes of a frame: the model's head, and subtype calls that agree with the binary call.

A subtype model is a tile model (models.tiles.TiledClassifier, mean pooling over the frame's native tiles) whose head
returns log-probabilities over the eight subtypes instead of one malignancy logit. Flat: one 8-way softmax.
Hierarchical (as in the published binary-then-subtype systems): log P(parent) + log P(subtype | parent), so the
probabilities of the four benign subtypes sum to the model's own P(benign).

On the dashboard a subtype is shown *within the routed malignancy model's call*: the subtype model's conditional
P(subtype | parent) is multiplied by the routed model's calibrated P(parent) (`subtype_given_binary`), so the subtype
shown can never contradict the benign/malignant verdict beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

BENIGN_SUBTYPES = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma")
MALIGNANT_SUBTYPES = ("ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma")
SUBTYPES = BENIGN_SUBTYPES + MALIGNANT_SUBTYPES
SUBTYPE_STRATEGIES = ("flat", "hierarchical")


def subtype_label(name: str) -> str:
    """'phyllodes_tumor' -> 'phyllodes tumor' for display."""
    return name.replace("_", " ")


class SubtypeHead(nn.Module):
    """(B, D) pooled embedding -> (B, 8) log-probabilities over SUBTYPES (benign four first)."""

    def __init__(self, dim: int, strategy: str = "hierarchical"):
        super().__init__()
        if strategy not in SUBTYPE_STRATEGIES:
            raise ValueError(f"subtype strategy must be one of {SUBTYPE_STRATEGIES}, not {strategy!r}")
        self.strategy = strategy
        nb, nm = len(BENIGN_SUBTYPES), len(MALIGNANT_SUBTYPES)
        if strategy == "flat":
            self.flat = nn.Linear(dim, nb + nm)
        else:
            self.parent, self.benign, self.malignant = nn.Linear(dim, 2), nn.Linear(dim, nb), nn.Linear(dim, nm)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.strategy == "flat":
            return torch.log_softmax(self.flat(h), dim=-1)
        lp = torch.log_softmax(self.parent(h), dim=-1)
        return torch.cat([lp[:, :1] + torch.log_softmax(self.benign(h), -1),
                          lp[:, 1:] + torch.log_softmax(self.malignant(h), -1)], dim=-1)


def subtype_given_binary(p_subtype: np.ndarray, p_malignant: float) -> np.ndarray:
    """P(subtype) = P(parent) x P(subtype | parent), the parent from the routed binary model; rows sum to 1."""
    p = np.asarray(p_subtype, float)
    nb = len(BENIGN_SUBTYPES)
    ben, mal = p[:nb] / max(p[:nb].sum(), 1e-12), p[nb:] / max(p[nb:].sum(), 1e-12)
    return np.concatenate([(1.0 - p_malignant) * ben, p_malignant * mal])


@dataclass
class SubtypeCall:
    """A frame's subtype: the call within the binary call, its probability, the alternatives and the class's CV recall."""

    subtype: str
    p_subtype: float
    top3: list[tuple[str, float]]
    probabilities: dict[str, float]
    cv_recall: dict | None = None  # {"value", "ci95", "n_patients", "testable"} of the called class, from the card
    notes: list[str] = field(default_factory=list)


def call_subtype(p: np.ndarray, malignant: bool, card=None) -> SubtypeCall:
    """The likeliest subtype within the binary call (benign four or malignant four), with the top 3 overall."""
    p = np.asarray(p, float)
    nb = len(BENIGN_SUBTYPES)
    i = nb + int(p[nb:].argmax()) if malignant else int(p[:nb].argmax())
    order = np.argsort(-p)[:3]
    return SubtypeCall(SUBTYPES[i], float(p[i]), [(SUBTYPES[j], float(p[j])) for j in order],
                       {s: float(v) for s, v in zip(SUBTYPES, p)}, class_cv_recall(card, SUBTYPES[i]) if card else None)


def class_cv_recall(card, subtype: str) -> dict | None:
    """The class's patient-grouped CV recall (with CI and patients) of the card's own strategy; None if absent."""
    ev = (card.evaluation or {}).get("subtype_cv") or {}
    res = (ev.get("results") or {}).get(card.evaluation.get("strategy", ""))
    if not res:
        return None
    m = res["metrics"].get(f"recall/{subtype}") or {}
    return {"value": m.get("value"), "ci95": m.get("ci95"), "n_patients": (ev.get("n_patients") or {}).get(subtype),
            "testable": subtype in (ev.get("testable") or [])}


def subtype_probabilities(lm, images, notes: list[list[str]] | None = None) -> np.ndarray:
    """(N, 8) P(subtype) from a subtype model, its own parent head included (one bag of tiles at a time); tiling
    notes (a frame of unknown scale) go to notes[i]."""
    if lm.card.task_kind != "subtype":
        raise ValueError(f"{lm.model_id} is a {lm.card.task_kind} model, not a subtype model")
    if list(lm.card.arch_config.get("classes") or []) != list(SUBTYPES):
        raise ValueError(f"{lm.model_id}: its classes {lm.card.arch_config.get('classes')} are not {list(SUBTYPES)}")
    notes = notes if notes is not None else [[] for _ in images]
    out = [np.exp(lm.logits(lm.preprocess(im, n).unsqueeze(0)))[0] for im, n in zip(images, notes)]
    return np.stack(out) if out else np.zeros((0, len(SUBTYPES)))
