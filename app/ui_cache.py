"""Process-wide caches for the Streamlit pages: each model is loaded (and sha256-checked) once per process."""
import streamlit as st

from app.dashboard import load_cards, model_folder
from models.config import models_root
from models.inference import load_model_folder


def current_root() -> str:
    return str(models_root())


@st.cache_resource(show_spinner="Loading and verifying model…")
def _cached_model(model_id: str, root: str):
    return load_model_folder(model_folder(model_id, root))


def cached_model(model_id: str):
    """The shared, verified model for this id (keyed by models root too, so roots never mix)."""
    return _cached_model(model_id, current_root())


@st.cache_data(ttl=60)
def _cached_cards(root: str):
    return load_cards(root)


def cached_cards():
    return _cached_cards(current_root())


@st.cache_data(max_entries=256, ttl=3600, show_spinner=False)  # entries hold a thumbnail, not the frame
def _cached_analysis(model_id: str, root: str, name: str, data: bytes, magnification: str, tta: bool):
    from app.dashboard import analyse_uploads
    from models.engine import MalignancyPredictor

    predictor = MalignancyPredictor(_cached_model(model_id, root), magnification=magnification, tta=tta)
    return analyse_uploads(predictor, [(name, data)])[0]


def cached_analysis(model_id: str, name: str, data: bytes, magnification: str, tta: bool = False):
    """Prediction + QC for one upload, computed once: moving a slider does not re-run the whole batch."""
    return _cached_analysis(model_id, current_root(), name, data, magnification, tta)


@st.cache_data(max_entries=32, ttl=3600, show_spinner=False)  # 32 maps of a 700x460 frame: about 40 MB (Compare's 7+)
def _cached_heatmap(model_id: str, root: str, name: str, data: bytes, method: str, target: int, branch: str):
    from app.dashboard import decode_frame
    from models.gradcam import gradcam_heatmap

    return gradcam_heatmap(_cached_model(model_id, root), decode_frame(data, name), method, target, branch)


def cached_heatmap(model_id: str, name: str, data: bytes, method: str, target: int, branch: str = "cnn"):
    """Grad-CAM for one uploaded frame, computed once per method/class/branch: the opacity slider only re-blends."""
    return _cached_heatmap(model_id, current_root(), name, data, method, target, branch)


@st.cache_data(ttl=600, show_spinner=False)
def _cached_reliability(model_id: str, root: str):
    from models.uncertainty import bins_from_predictions

    return bins_from_predictions(model_folder(model_id, root))


def cached_reliability(model_id: str):
    """The model's out-of-fold reliability bins (models.uncertainty), read once: each frame's 'how firm is this p'."""
    return _cached_reliability(model_id, current_root())


@st.cache_data(ttl=600, show_spinner=False)
def _cached_baseline_sentence(model_id: str, root: str, magnification: str | None):
    from app.dashboard import baseline_sentence

    return baseline_sentence(model_folder(model_id, root), magnification)


def cached_baseline_sentence(model_id: str, magnification: str | None):
    """Whether the model beats its frozen baseline (a paired bootstrap: computed once per model and magnification)."""
    return _cached_baseline_sentence(model_id, current_root(), magnification)


def cached_reliability_or_none(model_id: str):
    """The bins of a model named in a saved case, or [] when that model is no longer in the models root. The id is
    data from the database: only an id under the models root is read (never an explicit path)."""
    from models.engine.serve import model_path

    try:
        if model_id.startswith(("/", "./", "../", ".\\", "..\\")):
            return []  # an explicit path is the user's to give, never the database's
        model_path(model_id, current_root())  # the models root's own check: an id must not lead out of the root
        return cached_reliability(model_id)
    except Exception:  # noqa: BLE001 - a removed or renamed model folder: the case still opens
        return []


@st.cache_resource(show_spinner=False)
def _history(url: str):
    from app.history import open_store

    return open_store(url)


def history_store():
    """The case-history database (one engine per process and URL)."""
    from app.history import default_url

    return _history(default_url())


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def _cached_patches(model_id: str, root: str, items: tuple):
    from models.engine import IdcPredictor

    return IdcPredictor(_cached_model(model_id, root)).predict(list(items))


def cached_patches(model_id: str, items: tuple):
    """p(IDC) for one upload's patches, computed once per upload (moving to another patient only re-draws)."""
    return _cached_patches(model_id, current_root(), items)


@st.cache_data(max_entries=32, ttl=3600, show_spinner=False)  # a 50x50 map each: tiny
def _cached_patch_heatmap(model_id: str, root: str, name: str, data: bytes):
    from models.gradcam import gradcam_heatmap
    from models.idc import pad_patch
    from models.preprocess import load_image

    patch = pad_patch(load_image(data, name=name, min_side=1).image)
    return patch, gradcam_heatmap(_cached_model(model_id, root), patch, "Grad-CAM", 1)


def cached_patch_heatmap(model_id: str, name: str, data: bytes):
    """(padded patch, Grad-CAM for IDC-positive), computed once per patch: choosing another patient only re-draws."""
    return _cached_patch_heatmap(model_id, current_root(), name, data)


@st.cache_data(max_entries=64, ttl=3600, show_spinner=False)  # 8 numbers each
def _cached_subtype(model_id: str, root: str, name: str, data: bytes):
    import numpy as np

    from models.engine import SubtypePredictor

    r = SubtypePredictor(_cached_model(model_id, root)).predict_one((name, data))
    return np.asarray(r.p_subtypes) if r.ok else None


def cached_subtype(model_id: str, name: str, data: bytes):
    """The subtype model's P(subtype) for one upload (its own parent head), computed once per frame."""
    return _cached_subtype(model_id, current_root(), name, data)
