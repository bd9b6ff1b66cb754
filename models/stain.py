"""Stain normalisation (torchstain): Reinhard to the training set's global LAB statistics, and Macenko.

The target statistics are fitted by `training` on its training frames and stored in the card's
preprocessing config, so a model trained with normalisation applies exactly the same at inference.
torchstain's normalisers are used as they are; only their targets are set from our statistics
(torchstain fits a target to one image, we want the average over a training set).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

STAIN_METHODS = ("none", "reinhard", "macenko")


class StainError(ValueError):
    """Normalisation is impossible for this frame (e.g. almost no stained tissue for Macenko)."""


def _lab_stats(img: torch.Tensor) -> np.ndarray:
    """Per-channel (mean, std) of one uint8 (3,H,W) frame in torchstain's LAB scaling: shape (3, 2)."""
    from torchstain.torch.utils.rgb2lab import rgb2lab
    from torchstain.torch.utils.split import lab_split

    labs = lab_split(rgb2lab(img.float() / 255))
    return np.array([[float(c.mean()), float(c.std())] for c in labs])


def fit_reinhard(images: Sequence[torch.Tensor] | torch.Tensor) -> dict:
    """Target LAB means/stds = the average of the per-frame statistics over the training frames.

    Reinhard maps each frame's own mean/std onto the target's, so the target std is the typical within-frame
    std (an average of per-frame stds), not the pooled std that would also count between-frame variation.
    """
    stats = np.stack([_lab_stats(im) for im in images])
    return {"method": "reinhard", "target_means": stats[:, :, 0].mean(0).round(5).tolist(),
            "target_stds": stats[:, :, 1].mean(0).round(5).tolist(), "fitted_on_frames": int(len(stats))}


def fit_macenko(images: Sequence[torch.Tensor] | torch.Tensor) -> dict:
    """Reference stain matrix and max concentrations: element-wise median over the frames Macenko can fit."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    he, mc = [], []
    for im in images:
        n = TorchMacenkoNormalizer()
        try:
            n.fit(im)
        except Exception:  # too little stained tissue to estimate two stain vectors: not used for the target
            continue
        if torch.isfinite(n.HERef).all() and torch.isfinite(n.maxCRef).all():
            he.append(n.HERef.numpy())
            mc.append(n.maxCRef.numpy())
    if not he:
        raise StainError("Macenko could not be fitted on any training frame")
    return {"method": "macenko", "he_ref": np.median(he, 0).round(5).tolist(),
            "max_c_ref": np.median(mc, 0).round(5).tolist(), "fitted_on_frames": len(he)}


def fit_stain(method: str, images: Sequence[torch.Tensor] | torch.Tensor) -> dict | None:
    """Targets for `method` from uint8 (3,H,W) training frames; None for 'none'."""
    if method in (None, "", "none"):
        return None
    if method == "reinhard":
        return fit_reinhard(images)
    if method == "macenko":
        return fit_macenko(images)
    raise ValueError(f"unknown stain normalisation {method!r}; choose from {STAIN_METHODS}")


def normalize_stain(img: torch.Tensor, stain: dict | None) -> torch.Tensor:
    """Apply the card's stain normalisation to a uint8 (3,H,W) frame; raises StainError when impossible."""
    if not stain:
        return img
    method = stain["method"]
    try:
        if method == "reinhard":
            from torchstain.torch.normalizers import TorchReinhardNormalizer

            n = TorchReinhardNormalizer()
            n.target_means = torch.tensor(stain["target_means"], dtype=torch.float32)
            n.target_stds = torch.tensor(stain["target_stds"], dtype=torch.float32)
            out = n.normalize(img).permute(2, 0, 1).contiguous()  # torchstain returns (H,W,3) uint8, clamped
        elif method == "macenko":
            from torchstain.torch.normalizers import TorchMacenkoNormalizer

            n = TorchMacenkoNormalizer()
            n.HERef = torch.tensor(stain["he_ref"], dtype=torch.float32)
            n.maxCRef = torch.tensor(stain["max_c_ref"], dtype=torch.float32)
            norm, _, _ = n.normalize(img, stains=False)  # (H,W,3) int
            out = norm.clamp(0, 255).to(torch.uint8).permute(2, 0, 1).contiguous()
        else:
            raise ValueError(f"unknown stain normalisation {method!r}")
    except ValueError:
        raise
    except Exception as exc:  # torch linalg errors on frames with almost no stain
        raise StainError(f"{method} stain normalisation failed ({type(exc).__name__})") from None
    if not torch.isfinite(out.float()).all():
        raise StainError(f"{method} stain normalisation produced invalid pixels")
    return out
