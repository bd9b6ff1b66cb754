"""The routing file (`defaults.json`): its schema, validated before anything reads it, and who serves what."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

from models.config import models_root
from models.folders import IDC_DIR, SUBTYPE_DIR

DEFAULTS_FILE = "defaults.json"


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
    except RecursionError:
        raise DefaultsError(f"{path}: JSON nested too deeply; re-run `python -m training select-defaults`") from None
    try:
        if not isinstance(d, dict):
            raise DefaultsError(f"{path}: invalid routing file: top level: input should be a valid dictionary; re-run `python -m training "
                                "select-defaults`")
        _DEFAULTS.validate_python({k: v for k, v in d.items() if k not in _TASK_DEFAULTS})
        for key, adapter in _TASK_DEFAULTS.items():
            if key in d:
                adapter.validate_python(d[key])
    except RecursionError:
        raise DefaultsError(f"{path}: JSON nested too deeply; re-run `python -m training select-defaults`") from None
    except ValidationError as exc:
        probs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg'][0].lower() + e['msg'][1:]}" for e in exc.errors()[:4])
        raise DefaultsError(f"{path}: invalid routing file: {probs}; re-run `python -m training select-defaults`") from None
    return d
