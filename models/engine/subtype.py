"""The eight BreakHis subtypes from the subtype model alone (its own benign/malignant parent head). Research only:
the Diagnose page and the predict CLI show a subtype only within a benign/malignant call (MalignancyPredictor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from models.engine.base import Item, Prediction, Predictor, Prepared, register_predictor


@dataclass
class SubtypePrediction(Prediction):
    subtype: str = ""
    p_subtype: float | None = None
    p_subtypes: tuple[float, ...] = ()  # P(subtype) for models.subtype.SUBTYPES, in that order
    top3: tuple[tuple[str, float], ...] = ()

    @property
    def p_malignant(self) -> float | None:
        return self.probability


@register_predictor
class SubtypePredictor(Predictor):
    task_kind: ClassVar[str] = "subtype"
    result_type = SubtypePrediction
    csv_columns: ClassVar[tuple[str, ...]] = ("path", "task", "model_id", "subtype", "p_subtype", "p_malignant", "top3",
                                               "warning")
    default_batch_size: ClassVar[int] = 1  # one bag of tiles at a time

    def prepare(self, item: Item, index: int) -> Prepared:
        from models.engine.base import decode
        from models.quality import check_quality

        li = decode(item)
        q = check_quality(li.image, self.magnification)
        return Prepared(index, li.image, q, list(li.warnings) + list(q.warnings))  # QC is said, not a referral here

    def infer(self, batch: Sequence[Prepared]) -> list[dict]:
        from models.subtype import subtype_probabilities

        notes: list[list[str]] = [[] for _ in batch]
        ps = subtype_probabilities(self.model, [p.image for p in batch], notes)
        return [{"p": p, "notes": n} for p, n in zip(ps, notes)]

    def postprocess(self, prepared: Prepared, output: dict, result: SubtypePrediction) -> None:
        from models.subtype import BENIGN_SUBTYPES, call_subtype

        p = output["p"]
        pm = float(p[len(BENIGN_SUBTYPES):].sum())
        c = call_subtype(p, pm >= 0.5)
        result.probability, result.label = pm, "malignant" if pm >= 0.5 else "benign"
        result.subtype, result.p_subtype = c.subtype, float(c.p_subtype)
        result.p_subtypes, result.top3 = tuple(float(v) for v in p), tuple((s, float(v)) for s, v in c.top3)
        result.decision, result.decision_kind = result.label, "call"
        result.reason = "research only: the subtype model's own parent head, no referral policy"
        result.warnings = tuple(prepared.notes + output["notes"])

    def row(self, r: SubtypePrediction) -> dict:
        return {"path": r.name, "task": "subtype", "model_id": r.model_id, "subtype": r.subtype,
                "p_subtype": "" if r.p_subtype is None else repr(r.p_subtype),
                "p_malignant": "" if r.probability is None else repr(r.probability),
                "top3": "; ".join(f"{s} {v:.3f}" for s, v in r.top3), "warning": r.warning}
