"""From a task (and magnification) to a ready Predictor: routing (models.routing), loading with verification, the
subtype model riding along. The CLI, the batch pipeline and the pages all get their predictors here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from models.engine.base import Predictor, predictor_class
from models.inference import LoadedModel, load_model_folder
from models.routing import DefaultsError, resolve


class ServeError(RuntimeError):
    """Nothing can serve the request; the message is one line and says what to do."""


def model_path(model_id: str, root: str | Path) -> Path:
    """A model id under the models root, or an explicit model folder given as a path. Never the working directory:
    a relative id is resolved under `root` only (a folder in the current directory named like a model id must not
    shadow the root); an explicit folder must be given as an absolute path or start with ./ or ../."""
    p = Path(model_id)
    explicit = p.is_absolute() or model_id.startswith(("./", "../", ".\\", "..\\"))
    if explicit:
        return p
    folder = Path(root) / model_id
    try:  # an id (or a symlink inside the root) must not lead out of the root: only an explicit path may
        folder.resolve().relative_to(Path(root).resolve())
    except ValueError:
        raise ServeError(f"{model_id}: resolves outside the models root {root}; name the folder explicitly "
                         "(an absolute path or ./path) to use it") from None
    return folder


def load_predictor(task: str = "malignancy", magnification: str | None = None, *, model: str | None = None,
                   root: str | Path | None = None, tta: bool = False, with_subtype: bool = False,
                   loader: Callable[[Path], LoadedModel] = load_model_folder, batch_size: int | None = None) -> Predictor:
    """The Predictor serving `task` (at `magnification` for frames), or `model` (an id or folder) when given."""
    from models.config import models_root

    root = Path(root) if root else models_root()
    if task == "malignancy" and magnification is None:
        raise ServeError("--magnification is required for --task malignancy (BreakHis frames)")
    cls = predictor_class(task)
    model_id = model
    if model_id is None:
        route = resolve(task, magnification, root)
        if route.model_id is None:
            raise ServeError(" ".join(route.notes) + f" Train one with: {route.train_command}")
        model_id = route.model_id
    folder = model_path(model_id, root)
    try:
        lm = loader(folder)
    except Exception as exc:  # integrity, missing files, refused card: one line, no traceback
        raise ServeError(f"cannot load model {model_id}: {exc}") from None
    if lm.card.task_kind != task:
        raise ServeError(f"{lm.model_id} is a {lm.card.task_kind} model; use --task {lm.card.task_kind}")
    kwargs: dict = {"magnification": magnification, "tta": tta, "batch_size": batch_size}
    if task == "malignancy" and with_subtype:
        try:
            sid = resolve("subtype", None, root).model_id
        except DefaultsError:
            sid = None
        if sid is not None:
            try:
                kwargs["subtype"] = loader(model_path(sid, root))
            except Exception as exc:
                raise ServeError(f"cannot load model {sid}: {exc}") from None
    return cls(lm, **kwargs)
