"""IDC-positive vs negative on 50x50 patches of the public IDC collection: p(IDC), the call, the patch's patient and
coordinates where its name carries them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from models.engine.base import Item, Prediction, Predictor, Prepared, register_predictor
from models.idc import PATCH, PATCH_MIN_SIDE, PatchName, pad_patch, parse_patch_name


@dataclass
class PatchPrediction(Prediction):
    patch: PatchName | None = None  # patient and coordinates, when the name carries them

    @property
    def p_idc(self) -> float | None:
        return self.probability

    def to_dict(self) -> dict:
        d = super().to_dict()
        p = d.pop("patch", None)
        d.update(patient=p["patient"] if p else "", x=p["x"] if p else None, y=p["y"] if p else None)
        return d


@register_predictor
class IdcPredictor(Predictor):
    task_kind: ClassVar[str] = "idc"
    result_type = PatchPrediction
    csv_columns: ClassVar[tuple[str, ...]] = ("path", "task", "model_id", "p_idc", "label", "warning")
    default_batch_size: ClassVar[int] = 64

    def new_result(self, item: Item) -> PatchPrediction:
        r = super().new_result(item)
        r.patch = parse_patch_name(item.name)
        return r

    def prepare(self, item: Item, index: int) -> Prepared:
        from models.engine.base import decode

        li = decode(item, PATCH_MIN_SIDE)
        notes = list(li.warnings)
        img = pad_patch(li.image, notes)
        if max(li.image.size) > 4 * PATCH:
            notes.append(f"{li.image.width}x{li.image.height} is far larger than the {PATCH}x{PATCH} patches this model "
                         "was trained on; it was shrunk to the model's input and the result is unreliable")
        return Prepared(index, img, None, notes)

    def infer(self, batch: Sequence[Prepared]) -> list[dict]:
        x = torch.stack([self.model.preprocess(p.image) for p in batch])
        return [{"p": float(p)} for p in self.model.probabilities(x, self.tta)]

    def postprocess(self, prepared: Prepared, output: dict, result: PatchPrediction) -> None:
        p = output["p"]
        result.probability = p
        result.label = "IDC-positive" if p >= self.model.card.threshold else "IDC-negative"
        # no refer policy is fitted for patch models: the call is the decision, and the reason says so
        result.decision, result.decision_kind = result.label, "call"
        result.reason = "no referral policy fitted for patch models: every readable patch is called"
        result.warnings = tuple(prepared.notes)

    def row(self, r: PatchPrediction) -> dict:
        return {"path": r.name, "task": "idc", "model_id": r.model_id,
                "p_idc": "" if r.probability is None else repr(r.probability), "label": r.label, "warning": r.warning}
