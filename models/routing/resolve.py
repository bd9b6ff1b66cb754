"""`resolve(task, magnification) -> Route`: which model serves, and what the user must be told about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.archs import file_sha256
from models.card import MAGNIFICATIONS, TASK_KINDS
from models.config import lite2_init_hint, models_root
from models.routing.schema import DefaultsError, read_defaults
from models.routing.thresholds import few_patients, weak_auc


@dataclass
class Route:
    """The model serving one task (and magnification), the routing entry behind it, and the notes to show."""

    task: str
    magnification: str | None
    model_id: str | None
    notes: list[str] = field(default_factory=list)
    train_command: str = ""
    entry: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The routing file's key: the magnification for frames, the task's name otherwise."""
        return self.magnification if self.task == "malignancy" else self.task


def train_command(task: str, magnification: str | None = None, root: str | Path = "magnif_models") -> str:
    """The command that trains a model for an unserved task or magnification."""
    if task == "idc":
        return (f"python -m training train-idc --data ../shared/data/idc --out {root}/idc/efficientnet_lite2_idc && "
                f"python -m training select-defaults --root {root}")
    if task == "subtype":
        return (f"python -m training train --task subtype --data ../shared/data/breakhis --out "
                f"{root}/subtype/efficientnet_lite2_subtype && python -m training select-defaults --root {root}")
    return (f"python -m training train --data PATH/TO/BreaKHis_v1.tar.gz --magnification {magnification} "
            f"--arch efficientnet_lite2 {lite2_init_hint()} "
            f"--out {root}/{magnification}/efficientnet_lite2 && python -m training select-defaults --root {root}")


def resolve(task: str = "malignancy", magnification: str | None = None, root: str | Path | None = None) -> Route:
    """The serving model for a task ("malignancy" needs a magnification) with every note a user must read: borrowed
    or pooled, why it serves, a card changed since routing, few patients, a weak AUC. Never raises for a bad routing
    file: the route then serves nothing and says why."""
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, not {task!r}")
    if task == "malignancy" and magnification not in MAGNIFICATIONS:
        raise ValueError(f"magnification must be one of {MAGNIFICATIONS}, not {magnification!r}")
    shown_root = str(root) if root else "magnif_models"
    what = magnification if task == "malignancy" else {"idc": "IDC patches", "subtype": "subtypes"}[task]
    key = magnification if task == "malignancy" else task
    try:
        d = read_defaults(root).get(key)
    except DefaultsError as exc:  # said on the page / CLI instead of a traceback; nothing served from a bad file
        return Route(task, magnification, None, [f"Routing is unavailable: {exc}"],
                     train_command(task, magnification, shown_root))
    if not d:
        return Route(task, magnification, None, [f"No model is trained for {what}."],
                     train_command(task, magnification, shown_root))
    notes = []
    if d.get("borrowed"):
        notes.append(f"{magnification} is served by a model trained at another magnification ({d['model_id']}), "
                     f"scored on held-out patients' {magnification} frames (its cross-magnification check): a borrowed model.")
    elif d.get("pooled"):
        notes.append(f"{magnification} is served by a pooled model trained on all magnifications "
                     f"({d['model_id']}), scored here on held-out patients' {magnification} frames.")
    if d.get("reason") and task == "malignancy":
        notes.append(f"Serves because: {d['reason']}.")
    sha = d.get("card_sha256")
    card_file = Path(root or models_root()) / d["model_id"] / "card.json"
    if sha and card_file.is_file() and file_sha256(card_file) != sha:
        notes.append(f"The card of {d['model_id']} changed after routing was decided; re-run "
                     "`python -m training select-defaults` so the routing rests on its current figures.")
    if task == "malignancy":
        n = d["n_patients"]
        if d.get("few_patients") or few_patients(n):
            notes.append(f"Its {magnification} figures rest on few patients ({n['benign']} benign, {n['malignant']} "
                         "malignant): treat them as weak evidence.")
        if weak_auc(d["auc"]):
            notes.append(f"Validated AUC at {magnification} is only {d['auc']:.2f}: a weak model.")
    elif task == "idc" and weak_auc(d["auc"]):
        notes.append(f"Validated patch AUC is only {d['auc']:.2f}: a weak model.")
    return Route(task, magnification, d["model_id"], notes, entry=d)


def default_model_id(key: str, root: str | Path | None = None) -> str | None:
    """Model id serving `key` (a magnification, or "idc" / "subtype": that task's model), or None when nothing serves
    it. Raises DefaultsError for a routing file that cannot be trusted (the CLI says so and stops)."""
    entry = read_defaults(root).get(key)
    return entry["model_id"] if entry else None
