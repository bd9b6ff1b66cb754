"""Where each task's model folders live under a models root (one place: loading, routing and the pages agree)."""
from __future__ import annotations

from pathlib import Path

from models.card import ALL, MAGNIFICATIONS, TASK_KINDS
from models.config import models_root

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
