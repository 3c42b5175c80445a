"""The report of a run's probes: :class:`DiagnosticsReport`, its text and JSON forms, and the
report files of a run directory (:func:`write_report`, :func:`load_report`,
:func:`remove_report`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlgraph._io import atomic_write_text, load_weights_only, write_json
from mtlgraph.diagnostics.stats import SIGNIFICANCE, mean_and_error, mutual_affinity, suggest_groups
from mtlgraph.exceptions import CheckpointError

REPORT_JSON = "diagnostics.json"
"""The report in a run directory, as JSON (read back by ``mtlgraph diagnose``)."""
REPORT_TEXT = "diagnostics.txt"
"""The report in a run directory, as the readable text of :meth:`DiagnosticsReport.to_text`."""
_FORMAT = "mtlgraph.diagnostics"


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
        """The mean cosine is :data:`SIGNIFICANCE` standard errors below 0."""
        return self.mean_cosine + SIGNIFICANCE * self.cosine_error < 0


@dataclass(frozen=True)
class DiagnosticsReport:
    """What the probes of a run found: conflicting pairs, task affinity, suggested trunks.

    Built by :meth:`from_state`, :func:`load_report` or read as ``Trainer.diagnostics``.

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
            ratio = math.exp(float(sum_log) / n_ratio) if n_ratio else math.nan
            names = str(module), str(a), str(b)
            pairs.append(PairStats(*names, int(n), mean, error, float(n_neg) / n, ratio))
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
        """Plain values for ``diagnostics.json`` (NaN stays NaN; :func:`write_report` writes it as
        ``null``)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "tasks": list(self.tasks),
            "probes": self.probes,
            "every": self.every,
            "step": self.step,
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
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
                    p["module"],
                    p["task_a"],
                    p["task_b"],
                    int(p["probes"]),
                    num(p["mean_cosine"]),
                    num(p["cosine_error"], math.inf),
                    num(p["negative_fraction"]),
                    num(p["norm_ratio"]),
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


def write_report(report: DiagnosticsReport, run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``diagnostics.json`` and ``diagnostics.txt`` into ``run_dir`` (each atomically).

    Example:
        >>> import tempfile
        >>> from mtlgraph.diagnostics import InterferenceMonitor, load_report, write_report
        >>> run_dir = tempfile.mkdtemp()
        >>> [p.name for p in write_report(InterferenceMonitor().report(), run_dir)]
        ['diagnostics.json', 'diagnostics.txt']
        >>> load_report(run_dir).probes
        0
    """
    directory = Path(run_dir)
    json_path = write_json(directory / REPORT_JSON, report.to_dict())
    text_path = atomic_write_text(directory / REPORT_TEXT, report.to_text() + "\n")
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
    directory = Path(run_dir)
    path = directory / REPORT_JSON
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"'{path}' is not valid JSON ({e}); delete it to read the report from the run's "
                "checkpoint instead"
            ) from e
        return DiagnosticsReport.from_dict(data)
    # where the training loop saves its last state (docs/checkpoints.md)
    last = directory / "checkpoints" / "last.pt"
    try:
        if not last.is_file():
            raise CheckpointError(f"'{last}' does not exist")
        state = load_weights_only(last)
        if not isinstance(state, dict):
            raise CheckpointError(f"'{last}' is not an mtlgraph training checkpoint")
    except CheckpointError as e:
        raise CheckpointError(
            f"no diagnostics in '{directory}': no {REPORT_JSON} and no readable checkpoint ({e}). "
            "Train with trainer.diagnostics set, e.g. trainer.diagnostics={every: 50}"
        ) from e
    saved = (state.get("hooks") or {}).get("diagnostics")  # the probe hook's state
    if saved is None:
        raise CheckpointError(
            f"no diagnostics in '{directory}': the run was trained without trainer.diagnostics; "
            "train it with trainer.diagnostics={every: 50} (docs/diagnostics.md)"
        )
    return DiagnosticsReport.from_state(saved)
