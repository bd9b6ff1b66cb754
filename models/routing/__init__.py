"""Routing in one place: the rule that picks each task's serving model (`rule`, written to defaults.json by
`python -m training select-defaults`), the routing file's schema (`schema`), `resolve(task, magnification) -> Route`
with its notes, and every trust threshold (`thresholds`)."""
from models.routing.resolve import Route, default_model_id, resolve, train_command  # noqa: F401
from models.routing.schema import DEFAULTS_FILE, DefaultsError, read_defaults  # noqa: F401
from models.routing.thresholds import FEW_PATIENTS, MIN_PATIENTS_PER_CLASS, WEAK_AUC, few_patients, weak_auc  # noqa: F401
