"""Inference library: model folders, preprocessing, prediction, metrics, explanations.

Imports neither `training` nor `pages`; both depend on it.
"""
from models.archs import ARCHITECTURES, build_model, InitError  # noqa: F401
from models.card import ModelCard, PreprocessConfig  # noqa: F401
from models.inference import (  # noqa: F401
    LoadedModel,
    ModelIntegrityError,
    load_model_folder,
    MAGNIFICATIONS,
)
from models.routing import default_model_id, resolve  # noqa: F401
