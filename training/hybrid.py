"""Phased fine-tuning of the hybrid CNN + ViT model (the published recipe, scaled to a CPU).

Phase 1: ViT branch, fusion and head on cached feature maps of the frozen CNN (cheap; 4 flip views per frame).
Phase 2: the last CNN stages join, at a smaller learning rate, on augmented frames.
Phase 3: everything, at smaller learning rates still.
Every epoch is scored on the validation patients; the best state over all phases wins, and each phase's
epochs, learning rates and best validation AUC are returned for the card.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.archs import arch_spec
from models.card import PreprocessConfig
from models.preprocess import normalize_uint8
from training.engine import (Compute, EarlyStopper, FitResult, optimise_epoch, predict_logits, sample_weights,
                             train_augmented_epoch, weighted_bce)

log = logging.getLogger("training")
FLIP_VIEWS = ("identity", "hflip", "vflip", "rot180")  # same (H, W) as the frame, so one batch shape


@dataclass
class HybridConfig:
    p1_epochs: int = 30
    p1_lr: float = 3e-4
    p1_patience: int = 8
    p2_epochs: int = 2
    p2_stages: int = 2
    p2_lr_cnn: float = 1e-4
    p2_lr_rest: float = 1e-4
    p3_epochs: int = 1
    p3_lr_cnn: float = 2e-5
    p3_lr_rest: float = 3e-5
    weight_decay: float = 0.05
    batch_size: int = 16
    seed: int = 0


def _view(x: torch.Tensor, v: str) -> torch.Tensor:
    return {"identity": x, "hflip": x.flip(-1), "vflip": x.flip(-2), "rot180": x.flip(-1).flip(-2)}[v]


@torch.inference_mode()
def cached_feature_maps(model: nn.Module, images: torch.Tensor, cfg: PreprocessConfig, batch: int = 16) -> torch.Tensor:
    """Frozen-CNN feature maps of the 4 flip views of every frame: float16 (4, N, C, h, w)."""
    model.eval()
    views = []
    for v in FLIP_VIEWS:
        maps = []
        for i in tqdm(range(0, len(images), batch), desc=f"feature maps ({v})", leave=False):
            maps.append(model.backbone(normalize_uint8(_view(images[i:i + batch], v), cfg)).half())
        views.append(torch.cat(maps))
    return torch.stack(views)


def _phase_params(model: nn.Module, arch_config: dict | None, stages: int | None) -> tuple[list, list]:
    """(CNN parameters made trainable, the rest); stages=None means every CNN stage."""
    spec = arch_spec("hybrid", arch_config)
    all_stages = spec.stages(model.backbone)
    cnn_train = all_stages if stages is None else all_stages[-stages:]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    cnn = [p for s in cnn_train for p in s.parameters()]
    for p in cnn:
        p.requires_grad_(True)
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    for p in rest:
        p.requires_grad_(True)
    return cnn, rest


def fit_hybrid(model: nn.Module, arch_config: dict | None, images: torch.Tensor, fmaps: torch.Tensor, y: np.ndarray,
               patients: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, cfg: PreprocessConfig,
               hc: HybridConfig, compute: Compute, desc: str = "") -> FitResult:
    """Three phases with early stopping on validation AUC (or, without validation, the given fixed schedule)."""
    torch.manual_seed(hc.seed)
    rng = np.random.default_rng(hc.seed)
    w_all = sample_weights(y, patients)
    stopper = EarlyStopper(y[val_idx], desc)
    has_val = stopper.has_val

    def val_logits(from_maps: bool) -> Callable[[], np.ndarray]:
        def from_feature_maps() -> np.ndarray:
            model.eval()
            with torch.inference_mode():
                return torch.cat([model.forward_from_features(fmaps[0, val_idx[i:i + 64]].float())
                                  for i in range(0, len(val_idx), 64)]).float().numpy()
        return from_feature_maps if from_maps else (lambda: predict_logits(model, images, cfg, val_idx))

    def loss_of(logit: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        return weighted_bce(logit, torch.from_numpy(y[b]).float(), torch.from_numpy(w_all[b]).float())

    # Phase 1: frozen CNN, cached maps.
    _, rest = _phase_params(model, arch_config, 0)
    opt = torch.optim.AdamW(rest, lr=hc.p1_lr, weight_decay=hc.weight_decay)
    p1 = "1: ViT + fusion + head (CNN frozen)"
    for ep in range(hc.p1_epochs):
        t0 = time.time()
        model.train()
        model.backbone.eval()
        perm = rng.permutation(train_idx)

        def p1_loss(b: np.ndarray) -> torch.Tensor:
            x = fmaps[rng.integers(0, len(FLIP_VIEWS), len(b)), b].float()  # a random flip view per frame
            return loss_of(model.forward_from_features(x), b)

        loss = optimise_epoch(perm, hc.batch_size, p1_loss, opt)
        stopper.step(model, p1, ep + 1, loss, val_logits(True), seconds=round(time.time() - t0, 1))
        if has_val and stopper.stale >= hc.p1_patience:
            break
    if has_val and stopper.best is not None:
        model.load_state_dict(stopper.best.state)  # later phases start from phase 1's best state

    # Phases 2 and 3: full forward passes on augmented frames.
    for name, epochs, stages, lr_cnn, lr_rest in (
            ("2: last CNN stages + ViT + fusion + head", hc.p2_epochs, hc.p2_stages, hc.p2_lr_cnn, hc.p2_lr_rest),
            ("3: everything", hc.p3_epochs, None, hc.p3_lr_cnn, hc.p3_lr_rest)):
        if epochs <= 0:
            continue
        cnn, rest = _phase_params(model, arch_config, stages)
        opt = torch.optim.AdamW([{"params": cnn, "lr": lr_cnn}, {"params": rest, "lr": lr_rest}],
                                weight_decay=hc.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        if compute.bf16:
            model = model.to(memory_format=torch.channels_last)
        spec = arch_spec("hybrid", arch_config)
        frozen = spec.stages(model.backbone)[:-stages] if stages else []
        for ep in range(epochs):
            t0 = time.time()
            model.train()
            for s in frozen:  # frozen stages keep their BatchNorm statistics
                s.eval()
            perm = rng.permutation(train_idx)
            loss = train_augmented_epoch(model, images, y, w_all, perm, cfg, compute, opt, hc.batch_size, rng,
                                         f"{desc} phase {name[0]} ep{ep + 1}")
            sched.step()
            sec = time.time() - t0
            stopper.step(model, name, ep + 1, loss, val_logits(False), seconds=round(sec, 1),
                         ms_per_image=round(1000 * sec / len(perm), 1))
        model = model.to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(True)
    res = stopper.best
    assert res is not None
    res.log = stopper.logs
    res.phases = _phase_summary(hc, stopper.phase_best)
    return res


def _phase_summary(hc: HybridConfig, phase_best: dict) -> list[dict]:
    names = ["1: ViT + fusion + head (CNN frozen)", "2: last CNN stages + ViT + fusion + head", "3: everything"]
    cfgs = [{"max_epochs": hc.p1_epochs, "lr": hc.p1_lr},
            {"max_epochs": hc.p2_epochs, "lr_cnn": hc.p2_lr_cnn, "lr_rest": hc.p2_lr_rest, "cnn_stages": hc.p2_stages},
            {"max_epochs": hc.p3_epochs, "lr_cnn": hc.p3_lr_cnn, "lr_rest": hc.p3_lr_rest}]
    return [{"phase": n, **c, "best_epoch": phase_best.get(n, {}).get("epoch"),
             "best_val_auc": phase_best.get(n, {}).get("val_auc")} for n, c in zip(names, cfgs)]


def final_schedule(hc: HybridConfig, fold_results: list[dict]) -> HybridConfig:
    """Schedule for the refit on all patients: phase 1 for the folds' median best epoch; a later phase runs only
    when most folds' best state came from it (or after it), for the median of its best epochs."""
    from dataclasses import replace

    p1 = [f["phases"][0]["best_epoch"] or hc.p1_epochs for f in fold_results]
    chosen = [int(f["phase_chosen"][0]) for f in fold_results]
    major = len(fold_results) / 2

    def later(ph: int, default: int) -> int:
        if sum(c >= ph for c in chosen) <= major:
            return 0
        eps = [f["phases"][ph - 1]["best_epoch"] or default for f in fold_results]
        return int(np.median(eps))

    p2 = later(2, hc.p2_epochs)
    p3 = later(3, hc.p3_epochs) if p2 else 0
    return replace(hc, p1_epochs=max(1, int(np.median(p1))), p2_epochs=p2, p3_epochs=p3)
