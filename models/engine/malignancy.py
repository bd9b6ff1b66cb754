"""Benign/malignant on BreakHis-style frames: QC, calibrated p(malignant) at the frame's magnification, the OOD
distance and the refer decision (models.refer), optionally the subtype within the call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from models.engine.base import Item, Prediction, Predictor, Prepared, register_predictor
from models.inference import LoadedModel


@dataclass
class FramePrediction(Prediction):
    """One frame's result: the decision first, then p(malignant), QC measures, the OOD distance."""

    magnification: str | None = None
    out_of_distribution: bool = False  # QC's colour/texture check: not an H&E frame
    ood_score: float | None = None
    blur_variance: float | None = None
    tissue_fraction: float | None = None
    he_fraction: float | None = None
    subtype: str = ""  # within the call, when a subtype model rides along (never for a referred frame)
    p_subtype: float | None = None
    subtype_model_id: str = ""
    thumbnail: bytes | None = None  # a small PNG the pages keep instead of the frame (set by the caller's `each`)
    pixel_sha256: str = ""  # of the decoded RGB pixels: a case counts the same frame once, whatever its name

    @property
    def p_malignant(self) -> float | None:
        return self.probability

    @property
    def counts_toward_case(self) -> bool:
        from models.refer import EVIDENCE_KINDS

        return self.decision_kind in EVIDENCE_KINDS


def pixel_sha256(image) -> str:
    """sha256 of an RGB image's size and pixels (the decoded content, not the file: a re-saved copy matches too)."""
    import hashlib

    h = hashlib.sha256(f"{image.width}x{image.height}:{image.mode}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


PREDICT_COLUMNS = ("path", "magnification", "model_id", "p_malignant", "label", "decision", "reason", "decision_kind",
                   "warning")
SUBTYPE_COLUMNS = ("subtype", "p_subtype", "subtype_model_id")


@register_predictor
class MalignancyPredictor(Predictor):
    """A frame model (own-magnification or pooled) at one magnification; `subtype` adds the subtype model's call
    within each benign/malignant call."""

    task_kind: ClassVar[str] = "malignancy"
    result_type = FramePrediction

    def __init__(self, model: LoadedModel, *, magnification: str | None = None, tta: bool = False,
                 batch_size: int | None = None, subtype: LoadedModel | None = None):
        super().__init__(model, magnification=magnification, tta=tta, batch_size=batch_size)
        if model.card.preprocess.tiles:
            self.batch_size = 1  # frames of unusual size give other tile counts: one bag at a time
        if subtype is not None and subtype.card.task_kind != "subtype":
            raise ValueError(f"{subtype.model_id} is a {subtype.card.task_kind} model, not a subtype model")
        self.subtype = subtype

    @property
    def csv_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.subtype is None:
            return PREDICT_COLUMNS
        return (*PREDICT_COLUMNS[:6], *SUBTYPE_COLUMNS, *PREDICT_COLUMNS[6:])

    def new_result(self, item: Item) -> FramePrediction:
        r = super().new_result(item)
        r.magnification = self.magnification
        if self.subtype is not None:
            r.subtype_model_id = self.subtype.model_id
        return r

    def prepare(self, item: Item, index: int) -> Prepared:
        from models.engine.base import decode
        from models.quality import check_quality

        li = decode(item)
        q = check_quality(li.image, self.magnification)
        return Prepared(index, li.image, q, list(li.warnings) + list(q.warnings))

    def infer(self, batch: Sequence[Prepared]) -> list[dict]:
        notes: list[list[str]] = [[] for _ in batch]
        ood: list = []
        probs = self.model.predict_images([p.image for p in batch], self.batch_size, self.tta, notes, ood,
                                          self.magnification)
        ood = ood or [None] * len(batch)
        return [{"p": float(p), "notes": n, "ood": None if o is None else float(o)} for p, n, o in zip(probs, notes, ood)]

    def postprocess(self, prepared: Prepared, output: dict, result: FramePrediction) -> None:
        from models.quality import qc_failures
        from models.refer import decide, ood_score_of

        p, q = output["p"], prepared.qc
        ood = output["ood"]
        if ood is None and self.model.policy is not None and self.model.policy.ood is not None:
            ood = ood_score_of(self.model, prepared.image)  # TTA or an architecture without a one-pass embedding
        d = decide(p, self.model.card.threshold, qc_failures(q), q.out_of_distribution, ood, self.model.policy,
                   self.model.policy_note)
        result.probability, result.label = p, self.model.label_for(p)
        result.pixel_sha256 = pixel_sha256(prepared.image)
        result.decision, result.reason, result.decision_kind = d.decision, d.reason, d.kind
        result.warnings = tuple(prepared.notes + output["notes"])
        result.out_of_distribution, result.ood_score = bool(q.out_of_distribution), ood
        result.blur_variance, result.tissue_fraction, result.he_fraction = (
            float(q.blur_variance), float(q.tissue_fraction), float(q.he_fraction))
        if self.subtype is not None and d.decision in ("benign", "malignant"):
            from models.subtype import call_subtype, subtype_given_binary, subtype_probabilities

            ps = subtype_probabilities(self.subtype, [prepared.image])[0]
            c = call_subtype(subtype_given_binary(ps, p), d.decision == "malignant")
            result.subtype, result.p_subtype = c.subtype, float(c.p_subtype)

    def row(self, r: FramePrediction) -> dict:
        d = {c: getattr(r, c, "") for c in self.csv_columns if c not in ("path", "warning", "p_malignant")}
        d.update(path=r.name, warning=r.warning, p_malignant="" if r.probability is None else repr(r.probability))
        if "p_subtype" in d:
            d["p_subtype"] = "" if r.p_subtype is None else repr(r.p_subtype)
        return {c: d[c] for c in self.csv_columns}
