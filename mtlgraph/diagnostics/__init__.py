"""Interference diagnostics: which tasks help each other, and which pull a shared module apart.

An :class:`InterferenceMonitor` probes gradient conflict and lookahead affinity; a
:class:`DiagnosticsReport` summarises them. Formulas and logged keys: ``docs/diagnostics.md``.
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
