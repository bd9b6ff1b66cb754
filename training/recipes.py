"""Recipes: how one model is fitted on some patients and checked on others, behind one small protocol.

`cross_validate`, `refit` and `hold_out` (training.train) only ever call a Recipe, so a new way of training is a
new Recipe, not another branch in the CV code. The network recipes (logistic regression / linear head / partial or
full fine-tuning on one backbone) share `engine.fit`; the hybrid's three phases are `hybrid.fit_hybrid`; both use
the one early stopper and loss in `training.engine`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.archs import build_model
from models.card import PreprocessConfig
from training.engine import (Compute, FitConfig, FitResult, cached_features, fit, predict_logits, sample_weights,
                             state_sha256)
from training.hybrid import HybridConfig, cached_feature_maps, final_schedule, fit_hybrid


@dataclass
class TrainingSet:
    """The frames a training run sees, decoded once, with their labels and patients."""

    df: pd.DataFrame
    images: torch.Tensor
    cfg: PreprocessConfig
    compute: Compute
    cache_dir: Path
    y: np.ndarray = field(init=False)
    patients: np.ndarray = field(init=False)
    weights: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.y = (self.df["label"] == "malignant").astype(int).to_numpy()
        self.patients = self.df["patient"].astype(str).to_numpy()
        self.weights = sample_weights(self.y, self.patients)


class Recipe(Protocol):
    """One way to fit a model. `fit` trains a fresh model on train_idx, early-stopping and calibrating on val_idx
    (empty: a fixed schedule); `for_refit` gives the recipe the final model trains with, from the folds' results."""

    name: str

    def fresh_model(self, seed: int) -> nn.Module: ...

    def fit(self, model: nn.Module, data: TrainingSet, train_idx: np.ndarray, val_idx: np.ndarray, seed: int,
            desc: str) -> FitResult: ...

    def tta_logits(self, model: nn.Module, res: FitResult, data: TrainingSet, idx: np.ndarray,
                   twin: bool = False) -> np.ndarray: ...

    def for_refit(self, per_fold: list[dict]) -> tuple["Recipe", dict]: ...

    def hyperparameters(self) -> dict: ...


@dataclass
class _Built:
    """Architecture, initialisation and builder options shared by the recipes."""

    arch: str
    init: str
    arch_config: dict
    vit_init: str | None = None

    def fresh_model(self, seed: int) -> nn.Module:
        # Seed before building: a scratch (or scratch-ViT) initialisation is drawn from the global torch RNG, which
        # earlier folds and evaluation options consume; unseeded, the same command gave different fold models.
        torch.manual_seed(seed)
        return build_model(self.arch, self.init, self.arch_config or None, self.vit_init)[0]


@dataclass
class NetworkRecipe(_Built):
    """logreg | linear | finetune | full on one backbone (engine.fit); head recipes read frozen features of the very
    network being trained, from the content-keyed feature store."""

    fc: FitConfig = field(default_factory=FitConfig)

    @property
    def name(self) -> str:
        return self.fc.recipe

    def features(self, model: nn.Module, data: TrainingSet, tta: bool = False) -> np.ndarray | None:
        if self.fc.recipe not in ("logreg", "linear", "finetune"):
            return None
        return cached_features(model, data.images, data.cfg, data.cache_dir, tta=tta)

    def fit(self, model, data, train_idx, val_idx, seed, desc) -> FitResult:
        return fit(model, self.arch, data.images, self.features(model, data), data.y, data.patients, train_idx,
                   val_idx, data.cfg, self.fc, data.compute, desc)

    def tta_logits(self, model, res, data, idx, twin=False) -> np.ndarray:
        if self.fc.recipe != "logreg":
            return predict_logits(model, data.images, data.cfg, idx, tta=True)
        # A linear head on pooled features: the 8-view mean logit is the head applied to the 8-view mean feature,
        # one cached pass instead of 8 forwards per fold.
        w_, b_ = res.twin_head if twin else (model.fc.weight.detach().double().numpy()[0], float(model.fc.bias.detach()))
        return self.features(model, data, tta=True)[idx].astype(np.float64) @ w_ + b_

    def for_refit(self, per_fold: list[dict]) -> tuple["NetworkRecipe", dict]:
        head_ep = int(np.median([f["best_head_epoch"] for f in per_fold])) or self.fc.head_epochs
        ft = [f["best_epoch"] if f["phase_chosen"] != "head" else 0 for f in per_fold]
        ft_ep = int(np.median(ft)) if self.fc.recipe in ("finetune", "full") else 0
        return (replace(self, fc=replace(self.fc, head_epochs=head_ep, finetune_epochs=ft_ep)),
                {"head_epochs": head_ep, "finetune_epochs": ft_ep, "source": "median of the folds' best epochs"})

    def hyperparameters(self) -> dict:
        return asdict(self.fc)


@dataclass
class HybridRecipe(_Built):
    """The CNN + ViT hybrid's three phases (hybrid.fit_hybrid); phase 1 reads the frozen CNN maps of the very
    network being trained (kept in memory, one network at a time: they are large)."""

    hc: HybridConfig = field(default_factory=HybridConfig)
    _maps: dict = field(default_factory=dict, repr=False)
    name: str = "phased (hybrid)"

    def feature_maps(self, model: nn.Module, data: TrainingSet) -> torch.Tensor:
        key = state_sha256(model.backbone)
        if key not in self._maps:
            self._maps.clear()
            self._maps[key] = cached_feature_maps(model, data.images, data.cfg)
        return self._maps[key]

    def fit(self, model, data, train_idx, val_idx, seed, desc) -> FitResult:
        return fit_hybrid(model, self.arch_config, data.images, self.feature_maps(model, data), data.y, data.patients,
                          train_idx, val_idx, data.cfg, replace(self.hc, seed=seed), data.compute, desc)

    def tta_logits(self, model, res, data, idx, twin=False) -> np.ndarray:
        return predict_logits(model, data.images, data.cfg, idx, tta=True)

    def for_refit(self, per_fold: list[dict]) -> tuple["HybridRecipe", dict]:
        hc = final_schedule(self.hc, per_fold)
        return (replace(self, hc=hc, _maps=self._maps),
                {"phase_epochs": [hc.p1_epochs, hc.p2_epochs, hc.p3_epochs],
                 "source": "phase 1: median of the folds' best epochs; a later phase only where most folds' best "
                           "state came from it"})

    def hyperparameters(self) -> dict:
        return asdict(self.hc)
