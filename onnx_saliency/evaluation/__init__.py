"""Evaluation of explanations: faithfulness and localisation metrics (metrics), ground-truth boxes and masks
(annotations), model-randomisation sanity checks (sanity), the runner over images x methods (runner) and its
tables, CSV/JSON and curve plots (output, plots)."""

from .runner import DEFAULT_METRICS, LOCALIZATION_METRICS, METRICS, Evaluation, Settings, evaluate, summary

__all__ = ["evaluate", "Evaluation", "Settings", "summary", "METRICS", "DEFAULT_METRICS", "LOCALIZATION_METRICS"]
