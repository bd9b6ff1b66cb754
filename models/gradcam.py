"""Grad-CAM family explanations (pytorch-grad-cam) that are safe on a model shared between sessions.

pytorch-grad-cam registers forward/backward hooks on the target layer; a heatmap and anything else running through
the same module at the same time (another heatmap, or a prediction in another session) would hand it the wrong
activations. The model's one lock (models.inference.model_lock), which prediction also takes, serialises them, and
the CAM object is used as a context manager so its hooks are removed after every call.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

from models.archs import arch_spec
from models.inference import LoadedModel
from models.locks import model_lock

CAM_METHODS = {"Grad-CAM": GradCAM, "Grad-CAM++": GradCAMPlusPlus, "EigenCAM": EigenCAM, "LayerCAM": LayerCAM}
CAM_BRANCHES = {"cnn": "CNN branch", "vit": "ViT branch", "combined": "CNN + ViT (mean of the two maps)"}


def cam_branches(lm: LoadedModel) -> list[str]:
    """Which explanation sources a model offers: a hybrid has a CNN and a ViT branch, others only the CNN."""
    return list(CAM_BRANCHES) if lm.card.architecture == "hybrid" else ["cnn"]


def target_layers(lm: LoadedModel, branch: str = "cnn") -> list[torch.nn.Module]:
    """The layers a map reads: one, or for a seed ensemble each member's (pytorch-grad-cam averages their maps)."""
    if lm.card.architecture == "seed_ensemble":
        layer = arch_spec(lm.card.architecture, lm.card.arch_config).cam_layer
        return [m.get_submodule(layer) for m in lm.model.members]
    return [target_layer(lm, branch)]


def target_layer(lm: LoadedModel, branch: str = "cnn") -> torch.nn.Module:
    if branch == "vit":
        return lm.model.vit.blocks[-1].norm1 if hasattr(lm.model.vit, "blocks") else lm.model.vit.vit.encoder.layers[-1].ln_1
    return lm.model.get_submodule(arch_spec(lm.card.architecture, lm.card.arch_config).cam_layer)


def cam_target(lm: LoadedModel, target_class: int):
    """What the map explains: a malignancy or IDC model's one logit (class 1, or 0 = its negation); a subtype
    model's log-probability of subtype `target_class` (index into models.subtype.SUBTYPES)."""
    if lm.card.task_kind == "subtype":
        k = len(lm.card.arch_config["classes"])
        if not 0 <= target_class < k:
            raise ValueError(f"{lm.model_id}: subtype index {target_class} is not in 0..{k - 1}")
        return ClassifierOutputTarget(target_class)
    if target_class not in (0, 1):
        raise ValueError(f"{lm.model_id} has one logit: target class 0 or 1, not {target_class}")
    return BinaryClassifierOutputTarget(target_class)


def _vit_reshape(lm: LoadedModel):
    from models.hybrid import vit_token_reshape

    return vit_token_reshape(lm.model)


def gradcam_heatmap(lm: LoadedModel, img: Image.Image, method: str = "Grad-CAM", target_class: int = 1,
                    branch: str = "cnn") -> np.ndarray:
    """(H, W) map in [0, 1] at the frame's own size, for class 1 (malignant) or 0 (benign); for a subtype model,
    for the subtype with index `target_class`.

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
    if lm.card.architecture == "tiles":
        return _tiled_heatmap(lm, img, method, target_class)
    x = lm.preprocess(img).unsqueeze(0)
    reshape = _vit_reshape(lm) if branch == "vit" else None
    with model_lock(lm.model), torch.enable_grad():
        with CAM_METHODS[method](model=lm.model, target_layers=target_layers(lm, branch),
                                 reshape_transform=reshape) as cam:
            grayscale = cam(input_tensor=x, targets=[cam_target(lm, target_class)])[0]
    heat = Image.fromarray(np.float32(grayscale)).resize(img.size, Image.BILINEAR)
    return np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)


def gradcam_overlay(img: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The frame with the heatmap blended on top (opacity = weight of the heatmap)."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - float(opacity)))


def colour_scale(width: int = 700, height: int = 16) -> Image.Image:
    """The heatmap's colour scale (the very colormap of gradcam_overlay), low on the left, high on the right."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return Image.fromarray(show_cam_on_image(np.zeros((height, width, 3), np.float32), ramp, use_rgb=True,
                                             image_weight=0.0))


def overlay_with_scale(overlay: Image.Image, caption: str) -> Image.Image:
    """The overlay with its colour scale and a caption underneath, for export (a heatmap without a scale misleads)."""
    from PIL import ImageDraw

    bar = colour_scale(overlay.width, 16)
    out = Image.new("RGB", (overlay.width, overlay.height + 48), "white")
    out.paste(overlay, (0, 0))
    out.paste(bar, (0, overlay.height + 4))
    d = ImageDraw.Draw(out)
    d.text((2, overlay.height + 22), "low", fill="black")
    d.text((overlay.width - 30, overlay.height + 22), "high", fill="black")
    d.text((60, overlay.height + 22), caption[: max(10, overlay.width // 7)], fill="black")
    return out


class _OneTile(torch.nn.Module):
    """The frame's logit as a function of tile i alone, the other tiles' embeddings held fixed: Grad-CAM of this
    is Grad-CAM of the frame's (attention-pooled) logit with respect to tile i's feature map."""

    def __init__(self, model: torch.nn.Module, h_all: torch.Tensor, i: int):
        super().__init__()
        self.model, self.h_all, self.i = model, h_all, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        f = ((m.pool(m.backbone(x)).flatten(1) - m.feat_mean) / m.feat_std).unsqueeze(1)
        h = torch.cat([self.h_all[:, :self.i], f, self.h_all[:, self.i + 1:]], dim=1)
        return m.bag_logit(h)


def _tiled_input(lm: LoadedModel, img: Image.Image):
    """The frame's tiles (boxes, tiled frame) and the model's input built from the same tiling (tiled once)."""
    from models.preprocess import normalize_uint8
    from models.tiles import tile_frame

    t = tile_frame(img)
    return t, normalize_uint8(t.pixels, lm.card.preprocess).unsqueeze(0)


def tile_attention(lm: LoadedModel, img: Image.Image) -> tuple[list[tuple[int, int, int, int]], np.ndarray, tuple[int, int]]:
    """(tile boxes in the tiled frame, each tile's attention weight, the tiled frame's (W, H)) for a tile model."""
    t, x = _tiled_input(lm, img)
    with model_lock(lm.model), torch.inference_mode():
        a = lm.model.attention(x)[0].double().numpy()
    return t.boxes, a, t.frame.size


def _tiled_heatmap(lm: LoadedModel, img: Image.Image, method: str, target_class: int) -> np.ndarray:
    """Per-tile CAM stitched into one full-frame map; each tile's map (scaled to [0, 1] by the CAM library) is
    weighted by its attention relative to the most-attended tile, so the stitched map also says which tiles
    the prediction rests on."""
    t, x = _tiled_input(lm, img)
    layer = lm.model.get_submodule(arch_spec(lm.card.architecture, lm.card.arch_config).cam_layer)
    with model_lock(lm.model):
        with torch.inference_mode():
            h_all = lm.model.tile_features(x).clone()
            att = lm.model.attention(x)[0].double().numpy()
        rel = att / att.max()
        W, H = t.frame.size
        heat = np.zeros((H, W), np.float32)
        with torch.enable_grad():
            for i, (top, left, bh, bw) in enumerate(t.boxes):
                with CAM_METHODS[method](model=_OneTile(lm.model, h_all, i), target_layers=[layer]) as cam:
                    g = cam(input_tensor=x[:, i], targets=[cam_target(lm, target_class)])[0]
                tile_map = np.asarray(Image.fromarray(np.float32(g)).resize((bw, bh), Image.BILINEAR)) * rel[i]
                region = heat[top:top + bh, left:left + bw]
                np.maximum(region, tile_map[:region.shape[0], :region.shape[1]], out=region)
    out = Image.fromarray(heat).resize(img.size, Image.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def tile_attention_overlay(img: Image.Image, boxes: list[tuple[int, int, int, int]], weights: np.ndarray,
                           tiled_size: tuple[int, int]) -> Image.Image:
    """The frame with each tile outlined and labelled with its attention weight (thicker = more attended)."""
    from PIL import ImageDraw, ImageFont

    frame = img.convert("RGB").resize(tiled_size, Image.BILINEAR) if img.size != tiled_size else img.convert("RGB").copy()
    draw = ImageDraw.Draw(frame)
    font = ImageFont.load_default(size=24)  # readable once the 700-px frame is shown at half size
    rel = weights / weights.max()
    for (top, left, bh, bw), a, r in zip(boxes, weights, rel):
        draw.rectangle([left + 2, top + 2, left + bw - 3, top + bh - 3], outline=(255, 215, 0), width=max(1, int(1 + 6 * r)))
        draw.rectangle([left + 6, top + 6, left + 76, top + 38], fill=(0, 0, 0))
        draw.text((left + 11, top + 9), f"{a:.2f}", fill=(255, 255, 255), font=font)
    return frame.resize(img.size, Image.BILINEAR) if img.size != tiled_size else frame
