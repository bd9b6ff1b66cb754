"""Patient-wise splits, stratified by label and seeded; a patient never appears in two parts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


def _patient_labels(df: pd.DataFrame) -> pd.Series:
    """One label per patient (the majority label of its frames)."""
    y = (df["label"] == "malignant").astype(int)
    return y.groupby(df["patient"].astype(str)).mean().round().astype(int)


def patient_split(df: pd.DataFrame, val: float = 0.15, test: float = 0.15, seed: int = 0) -> pd.Series:
    """'train'/'val'/'test' per row; patients of each label are shuffled and cut, at least one per part."""
    labels = _patient_labels(df)
    rng = np.random.default_rng(seed)
    part_of: dict[str, str] = {}
    for lab in (0, 1):
        pats = np.array(sorted(labels.index[labels == lab]))
        rng.shuffle(pats)
        n = len(pats)
        n_test = max(1, round(n * test)) if test > 0 and n >= 3 else 0
        n_val = max(1, round(n * val)) if val > 0 and n - n_test >= 2 else 0
        for i, p in enumerate(pats):
            part_of[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return df["patient"].astype(str).map(part_of).rename("part")


def grouped_kfold(df: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.Series:
    """Outer fold index per row from stratified grouped k-fold over patients."""
    k = min(k, int(_patient_labels(df).value_counts().min()))
    if k < 2:
        raise ValueError("grouped k-fold needs at least 2 patients of each label")
    y = (df["label"] == "malignant").astype(int).to_numpy()
    return pd.Series(stratified_group_folds(y, df["patient"].astype(str).to_numpy(), k, seed), index=df.index,
                     name="fold")


def stratified_group_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row: k folds stratified by y (binary or multi-class), no group split across folds."""
    fold = np.full(len(y), -1)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, te) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
        fold[te] = i
    return fold


def leave_one_patient_out(df: pd.DataFrame) -> pd.Series:
    """Fold index per row, one fold per patient (beware: pooled LOPO AUC is biased with few benign patients)."""
    pats = sorted(df["patient"].astype(str).unique())
    return df["patient"].astype(str).map({p: i for i, p in enumerate(pats)}).rename("fold")


def assert_patient_disjoint(patients: pd.Series, parts: pd.Series) -> None:
    """Raise if any patient appears in more than one part."""
    n_parts = pd.DataFrame({"p": patients.astype(str), "s": parts.astype(str)}).groupby("p")["s"].nunique()
    leaked = n_parts[n_parts > 1]
    if len(leaked):
        raise AssertionError(f"patients in more than one part: {list(leaked.index)[:10]}")


def write_split_csv(df: pd.DataFrame, path: str | Path, columns: list[str]) -> None:
    cols = ["path", "patient", "label", "magnification", *columns]
    df[cols].to_csv(path, index=False)
