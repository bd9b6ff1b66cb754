"""Every threshold that says how much to trust a routed figure, defined once (routing writes with them, the pages
and the CLI read with them)."""
from __future__ import annotations

FEW_PATIENTS = 20  # fewer held-out patients than this behind a figure: "few patients", weak evidence
MIN_PATIENTS_PER_CLASS = 5  # fewer patients of either class than this: also "few patients"
WEAK_AUC = 0.75  # a routed model validating below this AUC at a magnification is called weak wherever it serves


def few_patients(n_patients: dict) -> bool:
    """Whether a figure rests on few patients: under FEW_PATIENTS in all or under MIN_PATIENTS_PER_CLASS of a class."""
    n = {k: int(v) for k, v in n_patients.items()}
    return sum(n.values()) < FEW_PATIENTS or min(n.values(), default=0) < MIN_PATIENTS_PER_CLASS


def weak_auc(auc: float) -> bool:
    """Whether a validated AUC is too low to call the model anything but weak."""
    return not auc >= WEAK_AUC  # NaN is weak too
