"""Early stopping: a built-in :class:`~mtlgraph.Hook` that ends a run whose metric stopped
improving (``mtlgraph.EarlyStopping``; ``early_stopping`` in ``trainer.hooks``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from mtlgraph.exceptions import ConfigError
from mtlgraph.training.checkpoint import metric_mode
from mtlgraph.training.hooks import HOOKS, Hook, Run

__all__ = ["EarlyStopping"]


class EarlyStopping(Hook):
    """Stop the run when ``metric`` has not improved for ``patience`` evaluations.

    Args:
        metric: A key of the evaluation records, e.g. ``"task/dataset/valid/accuracy"``
            (checked when ``fit`` starts).
        patience: Evaluations without improvement before the run stops (>= 1).
        mode: ``"max"`` or ``"min"``; ``None``: the metric's direction (``higher_is_better``).
        min_delta: An improvement is a change by more than this (>= 0).

    Example:
        >>> from mtlgraph import EarlyStopping
        >>> EarlyStopping("t/d/valid/accuracy", patience=2).state_dict()
        {'metric': 't/d/valid/accuracy', 'best': None, 'best_step': None, 'bad': 0}
        >>> EarlyStopping("t/d/valid/accuracy", patience=0)
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: EarlyStopping: patience must be an integer >= 1, got 0
    """

    name = "early_stopping"

    def __init__(
        self,
        metric: str,
        patience: int = 3,
        mode: Literal["max", "min"] | None = None,
        min_delta: float = 0.0,
    ) -> None:
        problems = []
        if not isinstance(metric, str) or not metric:
            problems.append(
                f"metric must be a record key such as 't/d/valid/accuracy', got {metric!r}"
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            problems.append(f"patience must be an integer >= 1, got {patience!r}")
        if mode not in ("max", "min", None):
            problems.append(
                f"mode must be 'max', 'min' or None (the metric's direction), got {mode!r}"
            )
        if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            problems.append(f"min_delta must be a number >= 0, got {min_delta!r}")
        if problems:
            raise ConfigError([f"EarlyStopping: {p}" for p in problems])
        self.metric, self.patience, self.mode = metric, patience, mode
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # evaluations since the last improvement

    def on_fit_start(self, run: Run) -> None:
        """Check the metric against the run's record keys; settle the mode."""
        mode = metric_mode(self.metric, self.mode, run.metric_keys, "EarlyStopping metric")
        self.mode = mode  # type: ignore[assignment]

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        value = scores.get(self.metric)
        if value is None:
            return
        value, best, delta = float(value), self.best, self.min_delta
        if not math.isnan(value) and (
            best is None or (value > best + delta if self.mode == "max" else value < best - delta)
        ):
            self.best, self.best_step, self.bad = value, run.global_step, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            run.stop(
                f"early stopping: {self.metric} has not improved by more than {self.min_delta:g} "
                f"for {self.bad} evaluations (best {self.best!r} at step {self.best_step})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "bad": self.bad,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric") != self.metric:
            saved = state.get("metric")
            message = f"the checkpoint followed '{saved}', this run '{self.metric}'"
            raise ConfigError([f"EarlyStopping: {message}; resume with the same metric"])
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = state.get("best_step")
        self.bad = int(state.get("bad", 0))


HOOKS.register("early_stopping", EarlyStopping)
