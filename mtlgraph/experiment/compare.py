"""``mtlgraph compare``: final scores of many runs side by side (docs/report.md).

Runs whose configs differ only in their seeds form one group (mean ± sample standard deviation
over the seeds). One table per task and metric: a row per group, a column per dataset, the best
value of each column marked. Against single-task baseline runs, each group gets

    Δm% = 100 / K · Σ_k (-1)^{l_k} (M_k − B_k) / B_k

over the K (task, dataset, metric) scores of the split, where ``M_k`` is the run's score, ``B_k``
the mean of the baseline runs' scores, and ``l_k = 1`` when lower is better for the metric
(Maninis et al., 2019). Δm% is computed per run, then averaged over the group's seeds.
"""

from __future__ import annotations

import csv
import html
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlgraph.exceptions import ConfigError
from mtlgraph.experiment.runs import CONFIG_FILE, RunRecord

BASELINE = "single-task baseline"
"""The row label of the baseline runs."""
FORMATS = ("markdown", "csv", "html")


@dataclass
class Stat:
    """Mean ± sample standard deviation of ``n`` values (``std`` is 0 for one value)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """The statistic of ``values`` (at least one)."""
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))

    def text(self) -> str:
        """``0.8123 ± 0.0102`` (``0.8123`` for one value)."""
        return f"{self.mean:.4g} ± {self.std:.2g}" if self.n > 1 else f"{self.mean:.4g}"


@dataclass
class Group:
    """Runs that differ only in their seeds."""

    label: str
    runs: list[RunRecord]


@dataclass
class Table:
    """One task and metric: ``cells[row][dataset]``; ``best[dataset]`` is the best row."""

    task: str
    metric: str
    higher_is_better: bool
    datasets: list[str]
    cells: dict[str, dict[str, Stat]] = field(default_factory=dict)
    best: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    """What ``mtlgraph compare`` prints.

    Attributes:
        split: The split compared.
        groups: The run groups, in order.
        tables: One per task and metric.
        delta_m: Δm% per group label (empty without baselines).
    """

    split: str
    groups: list[Group]
    tables: list[Table]
    delta_m: dict[str, Stat] = field(default_factory=dict)


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Group runs whose settings (config without seeds and paths) are equal; each group is
    labelled by the settings that tell groups apart (``trainer.balancer=mgda``)."""
    groups: list[tuple[dict[str, Any], list[RunRecord]]] = []
    for run in runs:
        setting = run.setting()
        for known, members in groups:
            if known == setting:
                members.append(run)
                break
        else:
            groups.append((setting, [run]))
    keys = sorted({k for s, _ in groups for k in s})
    differing = [k for k in keys if len({repr(s.get(k)) for s, _ in groups}) > 1]
    out = []
    for setting, members in groups:
        label = ", ".join(f"{k}={setting.get(k)}" for k in differing)
        out.append(Group(label or str(setting.get("experiment", members[0].path.name)), members))
    return out


def directions(run: RunRecord) -> dict[tuple[str, str], bool]:
    """``{(task, metric): higher_is_better}`` of the run's model (built from its config)."""
    from mtlgraph.experiment.build import build_model
    from mtlgraph.experiment.config import load_config

    if not run.config:
        raise ConfigError([f"{run.path}: no {CONFIG_FILE}: cannot tell each metric's direction"])
    model = build_model(load_config(run.path / CONFIG_FILE))
    return {
        (name, m): task.scorer.higher_is_better(m)
        for name, task in model.tasks.items()
        for m in task.scorer.metric_keys
    }


def _check_tasks(runs: Sequence[RunRecord], baselines: Sequence[RunRecord]) -> list[str]:
    """The tasks every run covers; runs of other tasks, or tasks no baseline has, are errors."""
    tasks = runs[0].tasks
    other = [r for r in runs if r.tasks != tasks]
    if other:
        lines = [f"{r.path}: tasks {', '.join(r.tasks)}" for r in [runs[0], *other]]
        raise ConfigError(
            lines,
            header="runs of different tasks cannot be compared (pass the single-task runs "
            "with --baseline):",
        )
    covered = {t for b in baselines for t in b.tasks}
    missing = [t for t in tasks if baselines and t not in covered]
    if missing:
        raise ConfigError(
            [f"no baseline run has task '{t}' (run mtlgraph baselines CONFIG)" for t in missing]
        )
    return tasks


def pick_split(runs: Sequence[RunRecord], split: str | None) -> str:
    """``split`` if every run scored it, else ``test`` or ``valid`` (the first every run has)."""
    from mtlgraph.metrics import split_key

    have = set.intersection(*({split_key(k)[2] for k in r.scores} for r in runs))
    if split is not None:
        if split not in have:
            raise ConfigError([f"--split {split}: not scored by every run (they share {have})"])
        return split
    for candidate in ("test", "valid", *sorted(have)):
        if candidate in have:
            return candidate
    raise ConfigError(["the runs share no scored split"])


def measures(run: RunRecord, tasks: Sequence[str], split: str) -> dict[tuple[str, str, str], float]:
    """``{(task, dataset, metric): score}`` of ``run`` on ``split`` (slices left out)."""
    from mtlgraph.graph.slices import SLICE_SEP
    from mtlgraph.metrics import split_key

    out = {}
    for key, value in run.scores.items():
        task, dataset, s, metric = split_key(key)
        if s == split and task in tasks and SLICE_SEP not in dataset:
            out[(task, dataset, metric)] = value
    return out


def compare(
    runs: Sequence[RunRecord], baselines: Sequence[RunRecord] = (), split: str | None = None
) -> Comparison:
    """Tables of ``runs`` (and Δm% against ``baselines``) on ``split``.

    Raises:
        ConfigError: Runs of different tasks, a task no baseline covers, a split not scored.
    """
    if not runs:
        raise ConfigError(["no runs to compare"])
    tasks = _check_tasks(runs, baselines)
    split = pick_split([*runs, *baselines], split)
    groups = group_runs(runs)
    direction = directions(runs[0])
    rows: dict[str, list[dict[tuple[str, str, str], float]]] = {
        g.label: [measures(r, tasks, split) for r in g.runs] for g in groups
    }
    base_values: dict[tuple[str, str, str], list[float]] = {}
    for b in baselines:
        for k, v in measures(b, tasks, split).items():
            base_values.setdefault(k, []).append(v)
    if baselines:
        rows[BASELINE] = [
            {k: v[i] for k, v in base_values.items() if i < len(v)}
            for i in range(max(map(len, base_values.values()), default=0))
        ]
    tables = _tables(rows, direction)
    result = Comparison(split, groups, tables)
    if baselines:
        base = {k: statistics.fmean(v) for k, v in base_values.items()}
        for g in groups:
            result.delta_m[g.label] = Stat.of([delta_m(m, base, direction) for m in rows[g.label]])
    return result


def delta_m(
    scores: Mapping[tuple[str, str, str], float],
    base: Mapping[tuple[str, str, str], float],
    direction: Mapping[tuple[str, str], bool],
) -> float:
    """Δm% of one run's ``scores`` against baseline means ``base`` (see the module doc).

    Example:
        >>> s = {("a", "d", "acc"): 0.9, ("b", "d", "mse"): 0.5}
        >>> b = {("a", "d", "acc"): 0.8, ("b", "d", "mse"): 0.4}
        >>> round(delta_m(s, b, {("a", "acc"): True, ("b", "mse"): False}), 4)  # (12.5 - 25) / 2
        -6.25

    Raises:
        ConfigError: A score with no baseline value, or a baseline value of 0.
    """
    missing = sorted("/".join(k) for k in scores if k not in base)
    zero = sorted("/".join(k) for k in scores if base.get(k) == 0)
    if missing or zero:
        raise ConfigError(
            [f"no baseline score for {k}" for k in missing]
            + [f"the baseline score of {k} is 0: Δm% divides by it" for k in zero]
        )
    terms = [
        (1 if direction[(t, m)] else -1) * (v - base[(t, d, m)]) / base[(t, d, m)]
        for (t, d, m), v in scores.items()
    ]
    return 100.0 * statistics.fmean(terms) if terms else math.nan


def _tables(
    rows: Mapping[str, Sequence[Mapping[tuple[str, str, str], float]]],
    direction: Mapping[tuple[str, str], bool],
) -> list[Table]:
    keys = sorted({k for runs in rows.values() for m in runs for k in m})
    tables: dict[tuple[str, str], Table] = {}
    for task, dataset, metric in keys:
        table = tables.get((task, metric))
        if table is None:
            table = tables[(task, metric)] = Table(task, metric, direction[(task, metric)], [])
        if dataset not in table.datasets:
            table.datasets.append(dataset)
        for label, runs in rows.items():
            values = [m[(task, dataset, metric)] for m in runs if (task, dataset, metric) in m]
            if values:
                table.cells.setdefault(label, {})[dataset] = Stat.of(values)
    for table in tables.values():
        for ds in table.datasets:
            have = {label: c[ds].mean for label, c in table.cells.items() if ds in c}
            pick = max if table.higher_is_better else min
            table.best[ds] = pick(have, key=have.__getitem__)
    return list(tables.values())


# ---------------------------------------------------------------- output


def to_markdown(result: Comparison) -> str:
    """Markdown tables; the best value of each column in bold."""
    lines = []
    for t in result.tables:
        arrow = "higher is better" if t.higher_is_better else "lower is better"
        lines += ["", f"### {t.task} {t.metric} ({result.split}; {arrow})", ""]
        lines.append("| run | " + " | ".join(t.datasets) + " |")
        lines.append("|---|" + "---|" * len(t.datasets))
        for label, cells in t.cells.items():
            shown = [_cell(t, label, ds, cells, "**{}**") for ds in t.datasets]
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
    if result.delta_m:
        best = max(result.delta_m, key=lambda g: result.delta_m[g].mean)
        lines += ["", f"### Δm% vs {BASELINE} (higher is better)", "", "| run | Δm% |", "|---|---|"]
        for label, stat in result.delta_m.items():
            text = f"{stat.mean:+.2f} ± {stat.std:.2f}" if stat.n > 1 else f"{stat.mean:+.2f}"
            lines.append(f"| {label} | {f'**{text}**' if label == best else text} |")
    seeds = ", ".join(f"{g.label}: {len(g.runs)}" for g in result.groups)
    lines += ["", f"runs per group (seeds): {seeds}"]
    return "\n".join(lines).lstrip("\n") + "\n"


def _cell(t: Table, label: str, ds: str, cells: Mapping[str, Stat], mark: str) -> str:
    if ds not in cells:
        return "-"
    text = cells[ds].text()
    return mark.format(text) if t.best.get(ds) == label else text


def to_csv(result: Comparison) -> str:
    """One line per table cell: task, metric, split, run, dataset, mean, std, n, best."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "metric", "split", "run", "dataset", "mean", "std", "n", "best"])
    for t in result.tables:
        for label, cells in t.cells.items():
            for ds, s in cells.items():
                best = int(t.best.get(ds) == label)
                w.writerow([t.task, t.metric, result.split, label, ds, s.mean, s.std, s.n, best])
    for label, s in result.delta_m.items():
        w.writerow(["all", "delta_m_percent", result.split, label, "all", s.mean, s.std, s.n, ""])
    return buf.getvalue()


def to_html(result: Comparison) -> str:
    """HTML tables (a fragment); the best value of each column in bold."""
    parts = []
    for t in result.tables:
        arrow = "higher is better" if t.higher_is_better else "lower is better"
        parts.append(f"<h3>{html.escape(f'{t.task} {t.metric} ({result.split}; {arrow})')}</h3>")
        head = "".join(f"<th>{html.escape(d)}</th>" for d in t.datasets)
        rows = [f"<table><tr><th>run</th>{head}</tr>"]
        for label, cells in t.cells.items():
            tds = "".join(
                f"<td>{_cell(t, label, ds, cells, '<b>{}</b>')}</td>" for ds in t.datasets
            )
            rows.append(f"<tr><td>{html.escape(label)}</td>{tds}</tr>")
        parts.append("\n".join([*rows, "</table>"]))
    if result.delta_m:
        rows = ["<h3>Δm% vs single-task baseline</h3><table><tr><th>run</th><th>Δm%</th></tr>"]
        rows += [
            f"<tr><td>{html.escape(label)}</td><td>{s.mean:+.2f} ± {s.std:.2f}</td></tr>"
            for label, s in result.delta_m.items()
        ]
        parts.append("\n".join([*rows, "</table>"]))
    return "\n".join(parts) + "\n"


def render(result: Comparison, fmt: str) -> str:
    """The comparison as ``markdown``, ``csv`` or ``html``."""
    return {"markdown": to_markdown, "csv": to_csv, "html": to_html}[fmt](result)


def plot(result: Comparison, path: str | Path) -> Path:
    """A bar chart per task and metric (mean, with the std as error bars) and one of Δm%."""
    from mtlgraph.experiment import figures

    panels = len(result.tables) + bool(result.delta_m)
    fig, axes = figures.new_figure(1, panels, width=4.0 * panels, row_height=3.4)
    for ax, t in zip(axes[0], result.tables, strict=False):
        labels = list(t.cells)
        for k, ds in enumerate(t.datasets):
            xs = [i + k * 0.8 / len(t.datasets) for i in range(len(labels))]
            stats = [t.cells[lab].get(ds, Stat(math.nan, 0.0, 0)) for lab in labels]
            ax.bar(
                xs,
                [s.mean for s in stats],
                0.8 / len(t.datasets),
                label=ds,
                yerr=[s.std for s in stats],
                capsize=3,
            )
        ends = [
            v
            for c in t.cells.values()
            for s in c.values()
            for v in (s.mean - s.std, s.mean + s.std)
        ]
        lo, hi = min(ends), max(ends)
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)  # the differences, not the distance from 0
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{t.task} {t.metric}", fontsize=9)
        ax.legend(fontsize=7)
    if result.delta_m:
        ax = axes[0][-1]
        labels = list(result.delta_m)
        ax.bar(
            range(len(labels)),
            [result.delta_m[g].mean for g in labels],
            yerr=[result.delta_m[g].std for g in labels],
            capsize=3,
        )
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title("Δm% vs single-task baseline", fontsize=9)
    Path(path).write_bytes(figures.png(fig, dpi=100))
    return Path(path)
