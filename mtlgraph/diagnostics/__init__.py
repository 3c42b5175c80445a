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
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph._io import move_to_device
from mtlgraph.balancing import SharedGradients, SharedLayout
from mtlgraph.data.datasets import Batch, DictDataLoader, collate_dicts
from mtlgraph.exceptions import CheckpointError, ConfigError
from mtlgraph.graph.model import MultitaskClassifier

logger = logging.getLogger(__name__)

PREFIX = "diagnostics"
"""First part of every key the monitor logs."""
REPORT_JSON = "diagnostics.json"
"""The report in a run directory, as JSON (read back by ``mtlgraph diagnose``)."""
REPORT_TEXT = "diagnostics.txt"
"""The report in a run directory, as the readable text of :meth:`DiagnosticsReport.to_text`."""
EXHAUSTIVE_MAX_TASKS = 8
"""Up to this many tasks :func:`suggest_groups` tries every partition (4,140 for 8 tasks)."""
SIGNIFICANCE = 2.0
"""A mean counts as non-zero when it is this many standard errors away from 0 (about 95%)."""
_FORMAT = "mtlgraph.diagnostics"
_STREAM = 8  # keeps the probe generator's seeds apart from other users of the trainer seed


@dataclass
class DiagnosticsConfig:
    """Settings of the interference probes (``TrainerConfig.diagnostics``; docs/diagnostics.md).

    Example:
        >>> from mtlgraph.diagnostics import DiagnosticsConfig
        >>> DiagnosticsConfig(every=0).validate()
        ['every: must be >= 1, got 0']
    """

    every: int = 50  # probe every N optimizer steps
    affinity: bool = True  # also measure lookahead task affinity (one extra forward per task)
    lr: float | None = None  # lookahead step size eta; null = each parameter's current lr
    batch_size: int | None = None  # rows per training loader in a probe; null = its batch_size

    def validate(self) -> list[str]:
        """Value checks beyond types; one sentence per problem."""
        problems = []
        if self.every < 1:
            problems.append(f"every: must be >= 1, got {self.every}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr: must be a positive number or null, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1 or null, got {self.batch_size}")
        return problems


# ---------------------------------------------------------------- the math


def pair_statistics(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and norm ratios of every pair of gradients from their Gram matrix.

    Args:
        gram: ``(K, K)`` with ``gram[a, b] = g_a·g_b``.

    Returns:
        ``(cosine, ratio)``, both ``(K, K)`` float64: ``cosine[a, b] = g_a·g_b / (‖g_a‖‖g_b‖)``
        and ``ratio[a, b] = ‖g_a‖/‖g_b‖``; NaN where a norm is zero.

    Example:
        >>> import torch
        >>> from mtlgraph.diagnostics import pair_statistics
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
        >>> cos, ratio = pair_statistics(g @ g.T)
        >>> cos[0].tolist(), ratio[0].tolist()
        ([1.0, -1.0, 0.0], [1.0, 0.5, 0.3333333333333333])
    """
    g = gram.detach().double()
    norms = g.diagonal().clamp(min=0).sqrt()
    zero = norms == 0
    safe = torch.where(zero, torch.ones_like(norms), norms)
    cosine = g / safe[:, None] / safe[None, :]
    ratio = norms[:, None] / safe[None, :]
    bad = zero[:, None] | zero[None, :]
    nan = torch.full_like(cosine, math.nan)
    return torch.where(bad, nan, cosine.clamp(-1.0, 1.0)), torch.where(bad, nan, ratio)


def lookahead_affinity(before: float, after: float) -> float:
    """``Z = 1 − L_after / L_before`` (Fifty et al. 2021); NaN when ``before`` is not positive.

    Example:
        >>> from mtlgraph.diagnostics import lookahead_affinity
        >>> lookahead_affinity(2.0, 1.5), lookahead_affinity(2.0, 2.5)
        (0.25, -0.25)
    """
    if not (before > 0 and math.isfinite(before) and math.isfinite(after)):
        return math.nan
    return 1.0 - after / before


def mean_and_error(n: int, total: float, squares: float) -> tuple[float, float]:
    """Mean and standard error of ``n`` values from their sum and sum of squares (error ``inf``
    for fewer than two values, NaN mean for none).

    Example:
        >>> from mtlgraph.diagnostics import mean_and_error
        >>> mean_and_error(4, 2.0, 1.5)  # values 0, 0.5, 0.5, 1: sd 0.408, error 0.204
        (0.5, 0.2041241452319315)
    """
    if n == 0:
        return math.nan, math.inf
    mean = total / n
    if n < 2:
        return mean, math.inf
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return mean, math.sqrt(variance / n)


def mutual_affinity(
    matrix: Sequence[Sequence[float]],
    i: int,
    j: int,
    errors: Sequence[Sequence[float]] | None = None,
) -> tuple[float, float]:
    """``Z_{i→j} + Z_{j→i}`` and its standard error (the measured one alone when the other is
    NaN; NaN when neither is; error ``inf`` without ``errors``)."""
    both = [(i, j), (j, i)]
    measured = [(a, b) for a, b in both if not math.isnan(matrix[a][b])]
    if not measured:
        return math.nan, math.inf
    value = sum(matrix[a][b] for a, b in measured)
    if errors is None:
        return value, math.inf
    return value, math.sqrt(sum(errors[a][b] ** 2 for a, b in measured))


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of ``items`` (restricted growth order: fewest groups first within a
    branch)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1 :]]


def suggest_groups(
    tasks: Sequence[str],
    matrix: Sequence[Sequence[float]],
    errors: Sequence[Sequence[float]] | None = None,
) -> tuple[list[list[str]], str]:
    """Group tasks into trunks from their affinity matrix.

    Maximises the total within-group mutual affinity ``Σ_{groups} Σ_{i<j} (Z_{i→j} + Z_{j→i})``
    subject to no two tasks with negative mutual affinity sharing a group; ties go to fewer
    groups, then to the larger total of all measured mutual affinities. A mutual affinity within
    :data:`SIGNIFICANCE` standard errors of 0 (when ``errors`` are given), or never measured,
    counts as 0: noise neither joins nor splits tasks. Up to :data:`EXHAUSTIVE_MAX_TASKS` tasks
    every partition is tried; beyond, groups are merged greedily (the largest gain first).

    Args:
        tasks: Task names, in the matrix's order.
        matrix: ``matrix[i][j] = Z_{i→j}`` (NaN where never measured).
        errors: Standard errors of the entries of ``matrix`` (``None``: exact values).

    Returns:
        ``(groups, method)``: groups of task names (each in ``tasks`` order; groups ordered by
        their first task) and ``"exhaustive"`` or ``"greedy"``.

    Example:
        >>> from mtlgraph.diagnostics import suggest_groups
        >>> nan = float("nan")
        >>> z = [[nan, 0.2, -0.3], [0.1, nan, 0.0], [-0.2, 0.05, nan]]
        >>> suggest_groups(["a", "b", "c"], z)
        ([['a', 'b'], ['c']], 'exhaustive')
    """
    k = len(tasks)
    mutual = [[0.0] * k for _ in range(k)]  # significant mutual affinities, else 0
    raw = [[0.0] * k for _ in range(k)]  # all measured ones (to break ties)
    for i, j in itertools.combinations(range(k), 2):
        m, error = mutual_affinity(matrix, i, j, errors)
        if errors is None:
            error = 0.0
        if not math.isnan(m):
            raw[i][j] = raw[j][i] = m
            if abs(m) > SIGNIFICANCE * error:
                mutual[i][j] = mutual[j][i] = m

    def allowed(group: Sequence[int]) -> bool:
        return all(mutual[i][j] >= 0 for i, j in itertools.combinations(group, 2))

    def key(partition: list[list[int]]) -> tuple[float, int, float]:
        pairs = [p for g in partition for p in itertools.combinations(g, 2)]
        return (
            sum(mutual[i][j] for i, j in pairs),
            -len(partition),
            sum(raw[i][j] for i, j in pairs),
        )

    if k <= EXHAUSTIVE_MAX_TASKS:
        best: list[list[int]] = [[i] for i in range(k)]
        best_key = key(best)
        for partition in _partitions(list(range(k))):
            if not all(allowed(g) for g in partition):
                continue
            candidate = key(partition)
            if candidate > best_key:
                best, best_key = partition, candidate
        method = "exhaustive"
    else:
        best = [[i] for i in range(k)]
        while True:
            merge: tuple[tuple[float, float], int, int] | None = None
            for x, y in itertools.combinations(range(len(best)), 2):
                if not allowed(best[x] + best[y]):
                    continue
                cross = [(i, j) for i in best[x] for j in best[y]]
                gain = (sum(mutual[i][j] for i, j in cross), sum(raw[i][j] for i, j in cross))
                if merge is None or gain > merge[0]:
                    merge = (gain, x, y)
            if merge is None:
                break
            _, x, y = merge
            best[x] = best[x] + best[y]
            del best[y]
        method = "greedy"
    groups = sorted((sorted(g) for g in best), key=lambda g: g[0])
    return [[tasks[i] for i in g] for g in groups], method


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class PairStats:
    """Gradient conflict of two tasks on one shared module, over the run's probes.

    Attributes:
        module: The shared module.
        task_a: First task (model order).
        task_b: Second task.
        probes: Probes that measured the pair.
        mean_cosine: Mean cosine of the two tasks' gradients on the module.
        cosine_error: Standard error of that mean (``inf`` with fewer than two probes).
        negative_fraction: Fraction of those probes with a negative cosine.
        norm_ratio: Geometric mean of ``‖g_a‖/‖g_b‖`` (1: balanced; 10: ``task_a`` dominates).
    """

    module: str
    task_a: str
    task_b: str
    probes: int
    mean_cosine: float
    cosine_error: float
    negative_fraction: float
    norm_ratio: float

    @property
    def conflicting(self) -> bool:
        """True when the mean cosine is negative by more than :data:`SIGNIFICANCE` standard
        errors."""
        return self.mean_cosine + SIGNIFICANCE * self.cosine_error < 0


@dataclass(frozen=True)
class DiagnosticsReport:
    """What the probes of a run found: conflicting pairs, task affinity, suggested trunks.

    Built from an :class:`InterferenceMonitor`'s state (:meth:`from_state`), from a run
    directory's ``diagnostics.json`` (:meth:`from_dict`, :func:`load_report`), or read as
    ``Trainer.diagnostics`` after a run with ``diagnostics`` set.

    Attributes:
        tasks: Task names in model order (the affinity matrix's rows and columns).
        probes: Number of probes.
        every: Optimizer steps between probes.
        step: Global step of the last probe.
        pairs: Gradient conflict per shared module and task pair, most conflicting first.
        affinity: ``affinity[i][j]`` = mean ``Z_{i→j}`` over the probes (NaN: never measured,
            as on the diagonal and between tasks that share no module).
        affinity_errors: Standard errors of those means.
        affinity_probes: How many probes measured each entry.
        grouping: Suggested trunks (:func:`suggest_groups`): groups of task names.
        method: ``"exhaustive"`` or ``"greedy"``.

    Example:
        >>> from mtlgraph.diagnostics import InterferenceMonitor
        >>> report = InterferenceMonitor().report()  # before any probe
        >>> report.probes, report.grouping
        (0, ())
    """

    tasks: tuple[str, ...]
    probes: int
    every: int
    step: int
    pairs: tuple[PairStats, ...]
    affinity: tuple[tuple[float, ...], ...]
    affinity_errors: tuple[tuple[float, ...], ...]
    affinity_probes: tuple[tuple[int, ...], ...]
    grouping: tuple[tuple[str, ...], ...]
    method: str

    # ------------------------------------------------------------ construction

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DiagnosticsReport:
        """The report of an :meth:`InterferenceMonitor.state_dict` (e.g. from a checkpoint)."""
        tasks = [str(t) for t in state["tasks"]]
        pairs = []
        for module, a, b, n, sum_cos, squares, n_neg, sum_log, n_ratio in state["pairs"]:
            if n == 0:
                continue
            mean, error = mean_and_error(int(n), float(sum_cos), float(squares))
            pairs.append(
                PairStats(
                    module=str(module),
                    task_a=str(a),
                    task_b=str(b),
                    probes=int(n),
                    mean_cosine=mean,
                    cosine_error=error,
                    negative_fraction=float(n_neg) / n,
                    norm_ratio=math.exp(float(sum_log) / n_ratio) if n_ratio else math.nan,
                )
            )
        pairs.sort(key=lambda p: (p.mean_cosine, p.module, p.task_a, p.task_b))
        index = {t: i for i, t in enumerate(tasks)}
        matrix = [[math.nan] * len(tasks) for _ in tasks]
        errors = [[math.inf] * len(tasks) for _ in tasks]
        counts = [[0] * len(tasks) for _ in tasks]
        for source, target, n, total, squares in state["affinity"]:
            i, j = index[source], index[target]
            if n:
                matrix[i][j], errors[i][j] = mean_and_error(int(n), float(total), float(squares))
                counts[i][j] = int(n)
        groups, method = suggest_groups(tasks, matrix, errors)
        return cls(
            tasks=tuple(tasks),
            probes=int(state["probes"]),
            every=int(state["every"]),
            step=int(state["step"]),
            pairs=tuple(pairs),
            affinity=tuple(tuple(row) for row in matrix),
            affinity_errors=tuple(tuple(row) for row in errors),
            affinity_probes=tuple(tuple(row) for row in counts),
            grouping=tuple(tuple(g) for g in groups),
            method=method,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``diagnostics.json`` (NaN stays NaN; :func:`write_json` makes it
        ``null``)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "tasks": list(self.tasks),
            "probes": self.probes,
            "every": self.every,
            "step": self.step,
            "pairs": [
                {
                    "module": p.module,
                    "task_a": p.task_a,
                    "task_b": p.task_b,
                    "probes": p.probes,
                    "mean_cosine": p.mean_cosine,
                    "cosine_error": p.cosine_error,
                    "negative_fraction": p.negative_fraction,
                    "norm_ratio": p.norm_ratio,
                }
                for p in self.pairs
            ],
            "affinity": {
                "rows": "task stepped on (i)",
                "columns": "task whose loss changes (j)",
                "matrix": [list(row) for row in self.affinity],
                "errors": [list(row) for row in self.affinity_errors],
                "probes": [list(row) for row in self.affinity_probes],
            },
            "grouping": {"method": self.method, "groups": [list(g) for g in self.grouping]},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiagnosticsReport:
        """Inverse of :meth:`to_dict` (``null`` read back as NaN)."""

        def num(v: Any, missing: float = math.nan) -> float:
            return missing if v is None else float(v)

        if data.get("format") != _FORMAT:
            raise CheckpointError(
                f"not an mtlgraph diagnostics report (format {data.get('format')!r})"
            )
        aff = data["affinity"]
        return cls(
            tasks=tuple(data["tasks"]),
            probes=int(data["probes"]),
            every=int(data["every"]),
            step=int(data["step"]),
            pairs=tuple(
                PairStats(
                    module=p["module"],
                    task_a=p["task_a"],
                    task_b=p["task_b"],
                    probes=int(p["probes"]),
                    mean_cosine=num(p["mean_cosine"]),
                    cosine_error=num(p["cosine_error"], math.inf),
                    negative_fraction=num(p["negative_fraction"]),
                    norm_ratio=num(p["norm_ratio"]),
                )
                for p in data["pairs"]
            ),
            affinity=tuple(tuple(num(v) for v in row) for row in aff["matrix"]),
            affinity_errors=tuple(tuple(num(v, math.inf) for v in row) for row in aff["errors"]),
            affinity_probes=tuple(tuple(int(v) for v in row) for row in aff["probes"]),
            grouping=tuple(tuple(g) for g in data["grouping"]["groups"]),
            method=str(data["grouping"]["method"]),
        )

    # ------------------------------------------------------------ queries

    @property
    def conflicts(self) -> list[PairStats]:
        """Pairs with a negative mean cosine on some shared module, most conflicting first."""
        return [p for p in self.pairs if p.conflicting]

    def affinity_of(self, source: str, target: str) -> float:
        """Mean ``Z_{source→target}`` (NaN when never measured)."""
        return self.affinity[self.tasks.index(source)][self.tasks.index(target)]

    def mutual(self, a: str, b: str) -> tuple[float, float]:
        """``Z_{a→b} + Z_{b→a}`` and its standard error (see :func:`mutual_affinity`)."""
        i, j = self.tasks.index(a), self.tasks.index(b)
        return mutual_affinity(self.affinity, i, j, self.affinity_errors)

    def pair(self, a: str, b: str, module: str | None = None) -> PairStats | None:
        """The conflict statistics of tasks ``a`` and ``b`` (either order) on ``module``, or on
        their most conflicting shared module when ``module`` is ``None``."""
        for p in self.pairs:  # most conflicting first
            if {p.task_a, p.task_b} == {a, b} and module in (None, p.module):
                return p
        return None

    # ------------------------------------------------------------ text

    def to_text(self) -> str:
        """The readable report: conflict table, affinity matrix, suggested trunks with evidence."""
        if self.probes == 0:
            return "Interference diagnostics: no probe ran (fewer optimizer steps than `every`)."
        lines = [
            f"Interference diagnostics: {self.probes} probes (every {self.every} steps, last at "
            f"step {self.step}), tasks {', '.join(self.tasks)}",
            "",
            "Gradient conflict on shared modules. cosine < 0: the tasks pull the module apart",
            f"(CONFLICT: {SIGNIFICANCE:g} standard errors below 0); norm ratio: geometric mean of",
            "|g_a|/|g_b|, far from 1 when one task dominates the module's updates.",
        ]
        if self.pairs:
            rows = [["module", "task_a ~ task_b", "cosine", "± error", "negative", "norm ratio"]]
            rows[0] += ["probes", ""]
            for p in self.pairs:
                rows.append(
                    [
                        p.module,
                        f"{p.task_a} ~ {p.task_b}",
                        f"{p.mean_cosine:+.3f}",
                        _fmt(p.cosine_error),
                        f"{p.negative_fraction:.0%}",
                        _fmt(p.norm_ratio),
                        str(p.probes),
                        "CONFLICT" if p.conflicting else "",
                    ]
                )
            lines += _table(rows, right={2, 3, 4, 5, 6})
        else:
            lines.append("  (no module is shared by two of the probed tasks)")
        if any(n for row in self.affinity_probes for n in row):
            lines += [
                "",
                "Lookahead task affinity Z[i->j] = 1 - L_j(after a step on task i) / L_j(before)",
                "(row i: the task stepped on; column j: the task whose loss changes; > 0 helps):",
            ]
            rows = [["i \\ j", *self.tasks]]
            for i, task in enumerate(self.tasks):
                rows.append([task, *(_signed(v) for v in self.affinity[i])])
            lines += _table(rows, right=set(range(1, len(self.tasks) + 1)))
            lines += ["", *self._grouping_text()]
        return "\n".join(lines)

    def _grouping_text(self) -> list[str]:
        lines = [
            "Suggested trunks: maximum total within-group mutual affinity Z[i->j] + Z[j->i],",
            f"tasks whose mutual affinity is {SIGNIFICANCE:g} standard errors below 0 apart "
            f"({self.method} search).",
        ]
        where = {t: g for g, tasks in enumerate(self.grouping) for t in tasks}
        for g, tasks in enumerate(self.grouping, 1):
            lines.append(f"  trunk {g}: {', '.join(tasks)}")
            for a, b in itertools.combinations(tasks, 2):
                lines.append(f"    together  {self._evidence(a, b)}")
        apart = [
            (a, b)
            for a, b in itertools.combinations(self.tasks, 2)
            if where[a] != where[b] and not math.isnan(self.mutual(a, b)[0])
        ]
        apart.sort(key=lambda ab: self.mutual(*ab)[0])
        for a, b in apart:
            lines.append(f"  apart       {self._evidence(a, b)}")
        if len(self.grouping) > 1:
            lines.append(
                "  (give each trunk its own module name: tasks naming the same module share it)"
            )
        return lines

    def _evidence(self, a: str, b: str) -> str:
        value, error = self.mutual(a, b)
        text = f"{a} ~ {b}: mutual affinity {_signed(value)} ± {_fmt(error)}"
        p = self.pair(a, b)
        if p is not None:
            text += (
                f"; on {p.module} cosine {p.mean_cosine:+.3f} ± {_fmt(p.cosine_error)}, "
                f"norm ratio {_fmt(p.norm_ratio)}"
            )
        return text


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.3g}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(w) if c in right else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


# ---------------------------------------------------------------- the monitor


class _LossOf(nn.Module):
    """Per-task losses of several batches as a module's forward (count-weighted means over the
    batches that label a task), so :func:`torch.func.functional_call` can run it with some
    parameters replaced."""

    def __init__(self, model: MultitaskClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for X, Y in batches:
            losses, n = self.model.calculate_loss(X, Y)
            for task_name, loss in losses.items():
                if task_name in sums:
                    sums[task_name] = sums[task_name] + loss * n[task_name]
                    counts[task_name] += n[task_name]
                else:
                    sums[task_name], counts[task_name] = loss * n[task_name], n[task_name]
        return {t: total / counts[t] for t, total in sums.items()}


class InterferenceMonitor:
    """Probes a model for gradient conflict and task affinity; accumulates over a run.

    The :class:`~mtlgraph.Trainer` creates one when ``diagnostics`` is set and calls
    :meth:`probe` every ``every`` optimizer steps; it can also be used by hand on any model and
    training loaders.

    Args:
        config: The probe settings (default :class:`DiagnosticsConfig`).
        seed: Seed of the probe rows (probe ``p`` of loader ``l`` draws from
            ``numpy.random.default_rng([seed, 8, l, p])``, so a resumed run draws the same rows).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
        >>> from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> trunk = nn.Linear(2, 1, bias=False)  # both tasks read the trunk's output
        >>> tasks = [Task(t, {"trunk": trunk}, [Operation("trunk", [("_input_", "x")])],
        ...               task_type="regression") for t in ("up", "down")]
        >>> model = MultitaskClassifier(tasks)
        >>> x = torch.randn(64, 2)
        >>> loaders = [DictDataLoader(DictDataset(f"d_{t}", "train", {"x": x}, {t: s * x[:, 0]}),
        ...                           batch_size=32) for t, s in (("up", 1.0), ("down", -1.0))]
        >>> monitor = InterferenceMonitor(DiagnosticsConfig(every=50))
        >>> values = monitor.probe(model, loaders, lr=0.1, step=50)
        >>> values["diagnostics/trunk/up~down/cosine"] < 0  # opposite targets conflict
        True
        >>> _ = monitor.probe(model, loaders, lr=0.1, step=100)  # other rows
        >>> monitor.report().grouping  # so they get separate trunks
        (('up',), ('down',))
    """

    def __init__(self, config: DiagnosticsConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else DiagnosticsConfig()
        problems = self.config.validate()
        if problems:
            raise ConfigError(problems, header="invalid diagnostics config:")
        self.seed = seed
        self._grads = SharedGradients()
        self._names: dict[int, tuple[MultitaskClassifier, dict[int, str]]] = {}
        self._probes = 0
        self._step = 0
        self._tasks: list[str] = []
        # (module, a, b) -> [probes, Σ cos, Σ cos², probes with cos < 0, Σ log ratio, ratios]
        self._pairs: dict[tuple[str, str, str], list[float]] = {}
        # (i, j) -> [probes, Σ Z_{i→j}, Σ Z_{i→j}²]
        self._affinity: dict[tuple[str, str], list[float]] = {}
        self._said: set[str] = set()

    @property
    def every(self) -> int:
        """Optimizer steps between probes."""
        return self.config.every

    # ------------------------------------------------------------ probe rows

    def probe_batches(
        self, loaders: Sequence[DictDataLoader], probe_index: int
    ) -> list[tuple[str, Batch]]:
        """The rows of probe number ``probe_index``: ``batch_size`` rows of every loader's
        dataset, without replacement, from the monitor's own generator."""
        out = []
        for i, loader in enumerate(loaders):
            dataset = loader.dataset
            n = len(dataset)
            size = min(n, self.config.batch_size or int(loader.batch_size or 1))
            if size == 0:
                continue
            rng = np.random.default_rng([self.seed, _STREAM, i, probe_index])
            rows = np.sort(rng.choice(n, size=size, replace=False))
            if loader.collate_fn is collate_dicts:
                batch = dataset.batch(torch.from_numpy(rows))
            else:  # the loader's own collate function (tokenisation, padding...)
                batch = loader.collate_fn([dataset[int(r)] for r in rows])
            out.append((dataset.name, batch))
        return out

    # ------------------------------------------------------------ one probe

    def probe(
        self,
        model: MultitaskClassifier,
        loaders: Sequence[DictDataLoader],
        lr: float | Sequence[Mapping[str, Any]],
        step: int,
    ) -> dict[str, float]:
        """Measure one probe and add it to the run's sums.

        Args:
            model: The model (its mode, weights, ``.grad`` and random state are left as found).
            loaders: The training loaders (one probe batch each).
            lr: The lookahead step size when ``config.lr`` is ``None``: a number, or the
                optimizer's ``param_groups`` (each shared parameter takes its group's ``lr``).
            step: The global optimizer step (probe number ``step // every``).

        Returns:
            The probe's values under their flat keys (``diagnostics/...``).
        """
        batches = [
            move_to_device(b, model.device)
            for _, b in self.probe_batches(loaders, step // self.config.every)
        ]
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                values = self._measure(model, batches, lr)
        finally:
            model.train(was_training)
        self._probes += 1
        self._step = step
        return values

    def _measure(
        self,
        model: MultitaskClassifier,
        batches: list[Batch],
        lr: float | Sequence[Mapping[str, Any]],
    ) -> dict[str, float]:
        loss_of = _LossOf(model)
        losses = loss_of(batches)
        order = {t: i for i, t in enumerate(model.task_names)}
        names = sorted(
            (t for t, v in losses.items() if bool(torch.isfinite(v.detach()))),
            key=order.__getitem__,
        )
        for t in names:
            if t not in self._tasks:
                self._tasks.append(t)
        self._tasks.sort(key=order.__getitem__)
        if len(names) < 2:
            self._say_once("few", "diagnostics: a probe labels fewer than two tasks (%s)", names)
            return {}
        plan = model.plan(names)
        layout = self._grads.layout(model.tasks, plan)
        if layout.size == 0:
            self._say_once("unshared", "diagnostics: tasks %s share no trainable module", names)
            return {}
        grads = self._grads.compute(layout, {t: losses[t] for t in names})
        values = self._conflict(plan.task_modules, layout, names, grads)
        if self.config.affinity:
            shared = {
                t: {m for m, _, _ in layout.modules if m in plan.task_modules[t]} for t in names
            }
            partners = {t: [u for u in names if u != t and shared[t] & shared[u]] for t in names}
            values.update(
                self._lookahead(model, loss_of, batches, layout, partners, grads, losses, lr)
            )
        return values

    def _conflict(
        self,
        task_modules: Mapping[str, tuple[str, ...]],
        layout: SharedLayout,
        names: list[str],
        grads: torch.Tensor,
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        for module, start, stop in layout.modules:
            users = [i for i, t in enumerate(names) if module in task_modules[t]]
            g = grads[users, start:stop]
            cosine, ratio = pair_statistics(g @ g.T)
            cos_l, ratio_l = cosine.tolist(), ratio.tolist()
            for x, y in itertools.combinations(range(len(users)), 2):
                a, b = names[users[x]], names[users[y]]
                c, r = cos_l[x][y], ratio_l[x][y]
                if math.isnan(c):
                    continue
                key = f"{PREFIX}/{module}/{a}~{b}"
                values[f"{key}/cosine"] = c
                values[f"{key}/norm_ratio"] = r
                acc = self._pairs.setdefault((module, a, b), [0, 0.0, 0.0, 0, 0.0, 0])
                acc[0] += 1
                acc[1] += c
                acc[2] += c * c
                acc[3] += int(c < 0)
                if r > 0 and math.isfinite(r):
                    acc[4] += math.log(r)
                    acc[5] += 1
        return values

    def _lookahead(
        self,
        model: MultitaskClassifier,
        loss_of: nn.Module,
        batches: list[Batch],
        layout: SharedLayout,
        partners: Mapping[str, list[str]],
        grads: torch.Tensor,
        losses: Mapping[str, torch.Tensor],
        lr: float | Sequence[Mapping[str, Any]],
    ) -> dict[str, float]:
        """``Z_{i→j}`` for every task ``i`` and each task ``j`` it shares a module with (row ``i``
        of ``grads`` is task ``i`` of ``partners``' order)."""
        param_names = self._param_names(model)
        keys = [f"model.{param_names[id(p)]}" for p in layout.shared]
        etas = self._step_sizes(layout, lr)
        before = {t: float(losses[t].detach()) for t in partners}
        values: dict[str, float] = {}
        with torch.no_grad():
            for i, source in enumerate(partners):
                if not partners[source]:
                    continue
                shifted = {
                    key: p.detach() - eta * grads[i, off : off + n].view_as(p)
                    for key, p, eta, (off, n) in zip(
                        keys, layout.shared, etas, layout.slices, strict=True
                    )
                }
                wanted = set(partners[source])
                needed = [b for b in batches if wanted & set(b[1])]  # batches labelling them
                after = torch.func.functional_call(loss_of, shifted, (needed,))
                for target in partners[source]:
                    z = lookahead_affinity(before[target], float(after[target]))
                    if math.isnan(z):
                        continue
                    values[f"{PREFIX}/affinity/{source}->{target}"] = z
                    acc = self._affinity.setdefault((source, target), [0, 0.0, 0.0])
                    acc[0] += 1
                    acc[1] += z
                    acc[2] += z * z
        return values

    def _param_names(self, model: MultitaskClassifier) -> dict[int, str]:
        cached = self._names.get(id(model))
        if cached is None or cached[0] is not model:
            cached = (model, {id(p): n for n, p in model.named_parameters()})
            self._names[id(model)] = cached
        return cached[1]

    def _step_sizes(
        self, layout: SharedLayout, lr: float | Sequence[Mapping[str, Any]]
    ) -> list[float]:
        if self.config.lr is not None:
            return [self.config.lr] * len(layout.shared)
        if isinstance(lr, (int, float)):
            return [float(lr)] * len(layout.shared)
        wanted = {id(p) for p in layout.shared}
        of = {id(p): float(g["lr"]) for g in lr for p in g["params"] if id(p) in wanted}
        return [of.get(id(p), 0.0) for p in layout.shared]

    def _say_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------ state and report

    def state_dict(self) -> dict[str, Any]:
        """The run's sums as plain values (``torch.load(weights_only=True)`` loads them)."""
        return {
            "version": 1,
            "every": self.config.every,
            "probes": self._probes,
            "step": self._step,
            "tasks": list(self._tasks),
            "pairs": [
                [m, a, b, int(v[0]), float(v[1]), float(v[2]), int(v[3]), float(v[4]), int(v[5])]
                for (m, a, b), v in self._pairs.items()
            ],
            "affinity": [
                [i, j, int(v[0]), float(v[1]), float(v[2])] for (i, j), v in self._affinity.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the sums of :meth:`state_dict` (a resumed run)."""
        self._probes = int(state["probes"])
        self._step = int(state["step"])
        self._tasks = [str(t) for t in state["tasks"]]
        self._pairs = {(str(m), str(a), str(b)): list(v) for m, a, b, *v in state["pairs"]}
        self._affinity = {(str(i), str(j)): list(v) for i, j, *v in state["affinity"]}

    def report(self) -> DiagnosticsReport:
        """The report of the probes so far."""
        return DiagnosticsReport.from_state(self.state_dict())


# ---------------------------------------------------------------- run directories


def write_report(report: DiagnosticsReport, run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``diagnostics.json`` and ``diagnostics.txt`` into ``run_dir`` (atomically)."""
    from mtlgraph.training.writers import write_json

    directory = Path(run_dir)
    json_path = write_json(directory / REPORT_JSON, report.to_dict())
    text_path = directory / REPORT_TEXT
    tmp = text_path.with_name(f".{text_path.name}.tmp")
    tmp.write_text(report.to_text() + "\n")
    os.replace(tmp, text_path)
    return [json_path, text_path]


def remove_report(run_dir: str | os.PathLike[str]) -> None:
    """Delete a previous run's report files (a new run in a used directory)."""
    for name in (REPORT_JSON, REPORT_TEXT):
        (Path(run_dir) / name).unlink(missing_ok=True)


def load_report(run_dir: str | os.PathLike[str]) -> DiagnosticsReport:
    """The report of a run directory: its ``diagnostics.json``, else (an interrupted run) the
    sums in its ``checkpoints/last.pt``.

    Raises:
        CheckpointError: The directory holds neither (the run had no ``diagnostics``).
    """
    import json

    from mtlgraph.training.checkpoint import load_checkpoint

    directory = Path(run_dir)
    path = directory / REPORT_JSON
    if path.is_file():
        return DiagnosticsReport.from_dict(json.loads(path.read_text()))
    try:
        state = load_checkpoint(directory)
    except CheckpointError as e:
        raise CheckpointError(
            f"no diagnostics in '{directory}': no {REPORT_JSON} and no readable checkpoint ({e}). "
            "Train with trainer.diagnostics set, e.g. trainer.diagnostics={every: 50}"
        ) from e
    saved = state.get("diagnostics")
    if saved is None:
        raise CheckpointError(
            f"no diagnostics in '{directory}': the run was trained without trainer.diagnostics; "
            "train it with trainer.diagnostics={every: 50} (docs/diagnostics.md)"
        )
    return DiagnosticsReport.from_state(saved)
