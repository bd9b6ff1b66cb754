"""Grad-CAM family explanations (pytorch-grad-cam) that are safe on a model shared between sessions.

pytorch-grad-cam registers forward/backward hooks on the target layer; two sessions computing at once on
the same module would read each other's activations. A per-model lock serialises CAM computation, and
the CAM object is used as a context manager so its hooks are removed after every call.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from models.archs import arch_spec
from models.inference import LoadedModel

CAM_METHODS = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "EigenCAM": EigenCAM, "LayerCAM": LayerCAM}
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(model: torch.nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        if model not in _LOCKS:
            _LOCKS[model] = threading.Lock()
        return _LOCKS[model]


CAM_BRANCHES = {"cnn": "CNN branch", "vit": "ViT branch", "combined": "CNN + ViT (mean of the two maps)"}


def cam_branches(lm: LoadedModel) -> list[str]:
    """Which explanation sources a model offers: a hybrid has a CNN and a ViT branch, others only the CNN."""
    return list(CAM_BRANCHES) if lm.card.architecture == "hybrid" else ["cnn"]


def target_layer(lm: LoadedModel, branch: str = "cnn") -> torch.nn.Module:
    if branch == "vit":
        return lm.model.vit.blocks[-1].norm1 if hasattr(lm.model.vit, "blocks") else lm.model.vit.vit.encoder.layers[-1].ln_1
    return lm.model.get_submodule(arch_spec(lm.card.architecture, lm.card.arch_config).cam_layer)


def _vit_reshape(lm: LoadedModel):
    from models.hybrid import vit_token_reshape

    return vit_token_reshape(lm.model)


def gradcam_heatmap(lm: LoadedModel, img: Image.Image, method: str = "Grad-CAM", target_class: int = 1,
                    branch: str = "cnn") -> np.ndarray:
    """(H, W) map in [0, 1] at the frame's own size, for class 1 (malignant) or 0 (benign).

    branch: 'cnn' (last CNN feature map), 'vit' (ViT branch tokens reshaped to their grid; hybrid only) or
    'combined' (the mean of the two maps, each already scaled to [0, 1]).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {list(CAM_METHODS)}")
    if branch not in cam_branches(lm):
        raise ValueError(f"{lm.model_id} offers CAM branches {cam_branches(lm)}, not {branch!r}")
    if branch == "combined":
        return (gradcam_heatmap(lm, img, method, target_class, "cnn")
                + gradcam_heatmap(lm, img, method, target_class, "vit")) / 2
    x = lm.preprocess(img).unsqueeze(0)
    reshape = _vit_reshape(lm) if branch == "vit" else None
    with _lock_for(lm.model), torch.enable_grad():
        with CAM_METHODS[method](model=lm.model, target_layers=[target_layer(lm, branch)],
                                 reshape_transform=reshape) as cam:
            grayscale = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(target_class)])[0]
    heat = Image.fromarray(np.float32(grayscale)).resize(img.size, Image.BILINEAR)
    return np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)


def gradcam_overlay(img: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The frame with the heatmap blended on top (opacity = weight of the heatmap)."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - float(opacity)))
