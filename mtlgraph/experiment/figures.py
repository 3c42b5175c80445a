"""The figures of a run report, drawn with matplotlib (the ``report`` extra) from a
:class:`~mtlgraph.experiment.runs.RunRecord`: learning curves, learning rate and balancer weights,
draws per dataset and epoch, interference heatmaps, expert gate usage.

Each function returns a ``matplotlib.figure.Figure`` (no pyplot, no global state) or ``None``
when the run logged nothing it could show. :func:`png` encodes one for HTML or TensorBoard.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mtlgraph._io import import_extra
from mtlgraph.diagnostics.monitor import PREFIX as PROBES_PREFIX
from mtlgraph.experiment.runs import RunRecord
from mtlgraph.metrics import split_key

LR_KEY = "model/all/train/lr"
WEIGHT_PREFIX = "model/all/train/weight/"
DRAWS_METRIC = "draws"


def new_figure(rows: int, cols: int, width: float = 10.0, row_height: float = 2.8) -> Any:
    (figure_module,) = import_extra("the run report", "report", "matplotlib.figure")
    fig = figure_module.Figure(figsize=(width, max(2.6, row_height * rows)), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def png(fig: Any, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def rgb(fig: Any) -> Any:
    """The figure as an ``(H, W, 3)`` uint8 array (for TensorBoard's ``add_image``)."""
    import numpy as np

    (agg,) = import_extra("the run report", "report", "matplotlib.backends.backend_agg")
    canvas = agg.FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def task_keys(run: RunRecord) -> dict[str, dict[str, list[str]]]:
    """``{task: {"loss": [train loss keys], "metrics": [evaluation keys]}}`` from the history
    (the config's tasks only: not the ``model`` aggregates or the diagnostics probes)."""
    tasks = set(run.config.get("tasks") or {})
    out: dict[str, dict[str, list[str]]] = {}
    for rec in run.history:
        for key in rec:
            try:
                task, _, split, metric = split_key(key)
            except ValueError:
                continue
            if task == "model" or (tasks and task not in tasks) or task == PROBES_PREFIX:
                continue
            kind = "loss" if split == "train" and metric == "loss" else "metrics"
            keys = out.setdefault(task, {"loss": [], "metrics": []})[kind]
            if key not in keys:
                keys.append(key)
    return dict(sorted(out.items()))


def learning_curves(run: RunRecord) -> Any | None:
    """Per task: its training loss (left) and each evaluation metric (right) against steps, the
    best checkpoint's step marked."""
    tasks = task_keys(run)
    if not tasks:
        return None
    fig, axes = new_figure(len(tasks), 2)
    best = run.best["step"] if run.best else None
    for row, (task, keys) in enumerate(tasks.items()):
        for col, kind in enumerate(("loss", "metrics")):
            ax = axes[row][col]
            for key in keys[kind]:
                steps, values = run.series(key)
                _, dataset, split, metric = split_key(key)
                label = f"{dataset} {split} {metric}" if kind == "metrics" else f"{dataset}"
                ax.plot(steps, values, marker="o", markersize=3, label=label)
            if best is not None:
                ax.axvline(
                    best, color="k", linestyle="--", linewidth=1, label=f"best (step {best})"
                )
            ax.set_title(f"{task}: {'training loss' if kind == 'loss' else 'evaluation'}")
            ax.set_xlabel("step")
            if ax.lines:
                ax.legend(fontsize=7)
    return fig


def lr_and_weights(run: RunRecord) -> Any | None:
    """The learning rate(s) and the balancer's task weights against steps."""
    keys = sorted({k for rec in run.history for k in rec})
    lrs = [k for k in keys if k == LR_KEY or k.startswith(LR_KEY + "/")]
    weights = [k for k in keys if k.startswith(WEIGHT_PREFIX)]
    if not lrs and not weights:
        return None
    fig, axes = new_figure(1, 2, row_height=3.2)
    for ax, group, title in (
        (axes[0][0], lrs, "learning rate"),
        (axes[0][1], weights, "task weight"),
    ):
        for key in group:
            steps, values = run.series(key)
            label = key.removeprefix(WEIGHT_PREFIX) if key in weights else key.split("/", 3)[3]
            ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(f"{title} (balancer weights)" if group is weights else title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    return fig


def draws_per_epoch(run: RunRecord) -> dict[int, dict[str, float]]:
    """``{epoch: {dataset: batches drawn}}``: each epoch's last record of draw counts."""
    out: dict[int, dict[str, float]] = {}
    for rec in run.history:
        counts = {}
        for key, value in rec.items():
            try:
                task, dataset, _, metric = split_key(key)
            except ValueError:
                continue
            if task == "model" and metric == DRAWS_METRIC:
                counts[dataset] = value
        if counts:
            out[int(rec.get("epoch", 0))] = counts
    return out


def draws_figure(run: RunRecord) -> Any | None:
    """Stacked bars: batches drawn from each dataset per epoch."""
    draws = draws_per_epoch(run)
    if not draws:
        return None
    fig, axes = new_figure(1, 1, width=8, row_height=3.2)
    ax = axes[0][0]
    epochs = sorted(draws)
    datasets = sorted({d for counts in draws.values() for d in counts})
    bottom = [0.0] * len(epochs)
    for ds in datasets:
        heights = [draws[e].get(ds, 0.0) for e in epochs]
        ax.bar(epochs, heights, bottom=bottom, label=ds)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    (ticker,) = import_extra("the run report", "report", "matplotlib.ticker")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # whole epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel("batches drawn")
    ax.set_title("batches drawn per dataset and epoch (batch scheduler)")
    ax.legend(fontsize=7)
    return fig


def heatmap(ax: Any, matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> None:
    """A square heatmap with values written in the cells (NaN cells left blank)."""
    finite = [abs(v) for row in matrix for v in row if math.isfinite(v)]
    scale = max(finite, default=1.0) or 1.0
    image = ax.imshow(matrix, cmap="RdBu", vmin=-scale, vmax=scale)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def interference_figure(report: Any) -> Any:
    """The diagnostics report's gradient cosine per shared module and lookahead affinity."""
    tasks = list(report.tasks)
    modules = sorted({p.module for p in report.pairs})
    fig, axes = new_figure(1, len(modules) + 1, width=4.2 * (len(modules) + 1), row_height=3.8)
    index = {t: i for i, t in enumerate(tasks)}
    for ax, module in zip(axes[0], modules, strict=False):
        cos = [[math.nan] * len(tasks) for _ in tasks]
        for p in report.pairs:
            if p.module == module:
                i, j = index[p.task_a], index[p.task_b]
                cos[i][j] = cos[j][i] = p.mean_cosine
        heatmap(ax, cos, tasks, f"gradient cosine on {module}")
    heatmap(axes[0][-1], report.affinity, tasks, "lookahead affinity Z[row -> column]")
    return fig


def gates_figure(usage: Mapping[str, Sequence[float]]) -> Any | None:
    """Mean gate weight per gate (row, labelled with its tasks) and expert (column)."""
    if not usage:
        return None
    rows = list(usage)
    width = max(len(w) for w in usage.values())
    matrix = [[*usage[g], *[math.nan] * (width - len(usage[g]))] for g in rows]
    fig, axes = new_figure(1, 1, width=7, row_height=0.5 * len(rows) + 2)
    ax = axes[0][0]
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(width), [f"expert {e}" for e in range(width)], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title("mean gate weight per expert (evaluation data)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
