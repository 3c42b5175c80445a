"""Interference diagnostics: which tasks help each other, and which pull a shared module apart.

Every ``every`` optimizer steps the :class:`~mtlgraph.Trainer` (``TrainerConfig.diagnostics``)
asks an :class:`InterferenceMonitor` to *probe* the model: one batch of rows from every training
loader, drawn from the monitor's own seeded generator (the training iterators do not move). On
that probe it measures, for the tasks the probe labels:

- **gradient conflict**: per-task gradients ``g_i = ∇_{θ_m} L_i`` on each shared module ``m``
  (a module two or more of the probe's tasks use), and for every pair of its tasks the cosine
  ``g_a·g_b / (‖g_a‖‖g_b‖)`` (negative: the tasks pull the module in opposing directions) and the
  norm ratio ``‖g_a‖/‖g_b‖`` (far from 1: one task dominates the module's updates);
- **lookahead task affinity** (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task
  Groupings for Multi-Task Learning"): with ``θ_s' = θ_s − η·∇_{θ_s} L_i``, a step on task ``i``
  alone on the shared parameters, ``Z_{i→j} = 1 − L_j(θ_s', θ_j) / L_j(θ_s, θ_j)``: positive when
  the step on ``i`` lowers ``j``'s loss. ``η`` is each shared parameter's current learning rate
  (or ``DiagnosticsConfig.lr``). The shifted parameters go through
  :func:`torch.func.functional_call`; the live weights are never modified.

The per-probe values are logged as ``diagnostics/<module>/<task_a>~<task_b>/cosine``,
``diagnostics/<module>/<task_a>~<task_b>/norm_ratio`` and ``diagnostics/affinity/<i>-><j>``.
Running sums over the run are the monitor's state (checkpointed); :class:`DiagnosticsReport`
turns them into a table of conflicting pairs, the mean affinity matrix and a suggested grouping
of tasks into trunks (:func:`suggest_groups`).

A probe never changes training: it runs with the model in eval mode (no dropout, batch-norm
statistics untouched), inside :func:`torch.random.fork_rng`, computes gradients with
:func:`torch.autograd.grad` (nothing is written to ``.grad``), and uses no collective operation
(under DDP every rank computes the same values from the same rows). A run with diagnostics ends
with the same parameters, bit for bit, as one without.

Where the code lives: :mod:`.stats` (the statistics and the grouping search), :mod:`.report`
(:class:`DiagnosticsReport` and the run-directory files), :mod:`.monitor`
(:class:`InterferenceMonitor`, :class:`DiagnosticsConfig`); the per-task gradients on shared
modules are :mod:`mtlgraph.gradients`. Every name below is importable from
``mtlgraph.diagnostics``.
"""

from __future__ import annotations

from mtlgraph.diagnostics.monitor import (
    PREFIX,
    DiagnosticsConfig,
    InterferenceMonitor,
    affinity_key,
    conflict_key,
)
from mtlgraph.diagnostics.report import (
    REPORT_JSON,
    REPORT_TEXT,
    DiagnosticsReport,
    PairStats,
    load_report,
    remove_report,
    write_report,
)
from mtlgraph.diagnostics.stats import (
    EXHAUSTIVE_MAX_TASKS,
    SIGNIFICANCE,
    lookahead_affinity,
    mean_and_error,
    mutual_affinity,
    pair_statistics,
    suggest_groups,
)

__all__ = [
    "EXHAUSTIVE_MAX_TASKS",
    "PREFIX",
    "REPORT_JSON",
    "REPORT_TEXT",
    "SIGNIFICANCE",
    "DiagnosticsConfig",
    "DiagnosticsReport",
    "InterferenceMonitor",
    "PairStats",
    "affinity_key",
    "conflict_key",
    "load_report",
    "lookahead_affinity",
    "mean_and_error",
    "mutual_affinity",
    "pair_statistics",
    "remove_report",
    "suggest_groups",
    "write_report",
]
