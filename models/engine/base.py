"""The engine: one Predictor per task kind (TIAToolbox's model/engine split). A predictor runs
decode + quality control -> preprocess -> infer a batch -> postprocess -> decide, and returns one typed result per
input in order; a bad input is a result with its reason, never an exception. The CLI, the pages, evaluation and the
batch pipeline all call these, so what a prediction is lives here only.

New tasks are one module: subclass Predictor, set `task_kind`, decorate with `@register_predictor`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

from PIL import Image

from models.inference import LoadedModel

Source = str | Path | bytes | Image.Image  # a file path, an upload's bytes, or an image already in memory (a slide tile)


@dataclass(frozen=True)
class Item:
    """One input: a display name and where its bytes are (a path, or the bytes themselves)."""

    name: str
    source: Source

    @classmethod
    def of(cls, x: "Item | Source | tuple[str, Source]") -> "Item":
        if isinstance(x, Item):
            return x
        if isinstance(x, tuple):
            return cls(str(x[0]), x[1])
        if isinstance(x, (bytes, Image.Image)):
            return cls("upload", x)
        return cls(str(x), x)


@dataclass
class Prediction:
    """What every task's result carries: the input, the model (id and card sha256), the probability of the task's
    positive class, the decision with its reason and machine kind (models.refer.DECISION_KINDS), warnings, errors."""

    name: str
    task: str
    model_id: str
    card_sha256: str = ""
    probability: float | None = None
    label: str = ""
    decision: str = "refer"
    reason: str = ""
    decision_kind: str = "unreadable"
    warnings: tuple[str, ...] = ()
    error: str = ""  # why the input could not be analysed ("" when it was)

    @property
    def ok(self) -> bool:
        return self.probability is not None

    @property
    def warning(self) -> str:
        return "; ".join(self.warnings)

    def to_dict(self) -> dict:
        """Plain values (JSON / Parquet ready); bytes fields left out."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, bytes)}


@dataclass
class Prepared:
    """An input decoded and checked, ready for the batch: the image, its QC report, its notes so far."""

    index: int
    image: Image.Image
    qc: Any = None
    notes: list[str] = field(default_factory=list)


def decode(item: Item, min_side: int | None = None):
    """The item as 8-bit RGB (models.preprocess.LoadedImage): decoded from a path or bytes, or normalised from an
    image already in memory; ImageError with one line for a bad one."""
    from models.preprocess import MIN_SIDE, load_image, to_rgb

    side = MIN_SIDE if min_side is None else min_side
    if isinstance(item.source, Image.Image):
        return to_rgb(item.source, item.name, min_side=side)
    return load_image(item.source, name=item.name, min_side=side)


class InputRefused(Exception):
    """An input this task cannot analyse; the message is the one-line reason shown to the user."""


class Predictor(ABC):
    """preprocess -> infer batch -> postprocess -> decide, for one loaded model of `task_kind`."""

    task_kind: ClassVar[str]
    result_type: ClassVar[type[Prediction]] = Prediction
    csv_columns: ClassVar[tuple[str, ...]] = ()
    default_batch_size: ClassVar[int] = 16

    def __init__(self, model: LoadedModel, *, magnification: str | None = None, tta: bool = False,
                 batch_size: int | None = None):
        if model.card.task_kind != self.task_kind:
            raise ValueError(f"{model.model_id} is a {model.card.task_kind} model, not a {self.task_kind} model")
        self.model = model
        self.magnification = magnification
        self.tta = tta
        self.batch_size = batch_size or self.default_batch_size

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def new_result(self, item: Item) -> Prediction:
        """The result of an input before anything is known: referred as unreadable until analysed."""
        return self.result_type(name=item.name, task=self.task_kind, model_id=self.model_id,
                                card_sha256=self.model.card_sha256)

    @abstractmethod
    def prepare(self, item: Item, index: int) -> Prepared:
        """Decode and check one input; raise ImageError / InputRefused with a one-line reason for a bad one."""

    @abstractmethod
    def infer(self, batch: Sequence[Prepared]) -> list[dict]:
        """Run the network on a batch of prepared inputs: one dict of raw outputs each (probability, OOD, ...)."""

    @abstractmethod
    def postprocess(self, prepared: Prepared, output: dict, result: Prediction) -> None:
        """Fill the result from the network's output: probability, decision and reason, warnings."""

    def predict(self, items: Iterable[Item | Source | tuple[str, Source]],
                each: Callable[[Prediction, Image.Image], None] | None = None) -> list[Prediction]:
        """One result per input, in order. `each(result, image)` runs once per decoded input after its decision,
        so a caller can add to a result (a thumbnail, a subtype) without decoding the file again."""
        from models.preprocess import ImageError

        results: list[Prediction] = []
        pending: list[Prepared] = []

        def flush() -> None:
            for prep, out in zip(pending, self.infer(pending)):
                res = results[prep.index]
                self.postprocess(prep, out, res)
                if each is not None:
                    each(res, prep.image)
            pending.clear()

        for raw in items:
            item = Item.of(raw)
            res = self.new_result(item)
            results.append(res)
            try:
                pending.append(self.prepare(item, len(results) - 1))
            except (ImageError, InputRefused) as exc:
                res.error = str(exc)
                res.reason = "the file could not be analysed"
                res.warnings = (str(exc),)
                continue
            if len(pending) >= self.batch_size:
                flush()
        if pending:
            flush()
        return results

    def predict_one(self, item: Item | Source | tuple[str, Source],
                    each: Callable[[Prediction, Image.Image], None] | None = None) -> Prediction:
        return self.predict([item], each)[0]

    def rows(self, results: Sequence[Prediction]) -> list[dict]:
        """The task's CSV rows (same columns for the predict CLI and the batch pipeline)."""
        return [self.row(r) for r in results]

    def row(self, r: Prediction) -> dict:
        d = r.to_dict()
        return {c: d.get(c, "") for c in self.csv_columns}


PREDICTORS: dict[str, type[Predictor]] = {}


def register_predictor(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: the Predictor serving its `task_kind` (one per task)."""
    if cls.task_kind in PREDICTORS and PREDICTORS[cls.task_kind] is not cls:
        raise ValueError(f"a predictor for {cls.task_kind!r} is already registered: {PREDICTORS[cls.task_kind].__name__}")
    PREDICTORS[cls.task_kind] = cls
    return cls


def predictor_class(task: str) -> type[Predictor]:
    """The registered Predictor of a task kind (the package models.engine registers the built-in ones on import)."""
    try:
        return PREDICTORS[task]
    except KeyError:
        raise ValueError(f"no predictor for task {task!r}; registered: {sorted(PREDICTORS)}") from None


def make_predictor(model: LoadedModel, **kwargs) -> Predictor:
    """The registered Predictor for a loaded model's task kind."""
    return predictor_class(model.card.task_kind)(model, **kwargs)
