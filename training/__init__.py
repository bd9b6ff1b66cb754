"""Training package: data indexing, patient-wise splits, recipes, evaluation and model cards."""
