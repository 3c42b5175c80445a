"""Interference diagnostics: which tasks help each other, and which pull a shared module apart.

Every ``every`` steps an :class:`InterferenceMonitor` probes the model on one batch of every
training loader and measures, per shared module and pair of tasks, the gradients' cosine and
norm ratio, and the lookahead task affinity ``Z_{i→j}`` (Fifty et al., NeurIPS 2021). Running
sums are its checkpointed state; :class:`DiagnosticsReport` turns them into conflicting pairs,
an affinity matrix and a suggested grouping of tasks (:func:`suggest_groups`). A probe never
changes training: eval mode, a forked RNG, :func:`torch.autograd.grad`, no collectives.
Formulas, logged keys and the files of a run: ``docs/diagnostics.md``.
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
