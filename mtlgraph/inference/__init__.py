"""Prediction, scoring and export over a model, typed against :class:`InferenceModel` (never the
model's class): the model calls in here, nothing here calls back.
"""

from mtlgraph.inference.evaluation import (
    head_widths,
    iter_predictions,
    predict,
    score,
    score_predictions,
)
from mtlgraph.inference.export import TaskGraph, export, max_export_error, run_exported
from mtlgraph.inference.predictions import read_predictions, write_predictions
from mtlgraph.inference.protocol import Batches, InferenceModel, eval_mode

__all__ = [
    "Batches",
    "InferenceModel",
    "TaskGraph",
    "eval_mode",
    "export",
    "head_widths",
    "iter_predictions",
    "max_export_error",
    "predict",
    "read_predictions",
    "run_exported",
    "score",
    "score_predictions",
    "write_predictions",
]
