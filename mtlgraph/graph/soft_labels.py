"""Soft (probabilistic) labels of classification tasks: recognition, checks (only here), and
the hard targets metrics score against; see ``docs/training.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtlgraph.metrics import active_rows

if TYPE_CHECKING:
    from mtlgraph.graph.task import Task

TOLERANCE = 1e-3
"""How far a multiclass soft row's sum may be from 1: rows written rounded (to 4 decimals,
say) pass, and the file sources renormalise them (:func:`renormalised`)."""


def _is_float(labels: Any) -> bool:
    if isinstance(labels, torch.Tensor):
        return labels.is_floating_point()
    return bool(np.issubdtype(np.asarray(labels).dtype, np.floating))


def is_soft_label(labels: torch.Tensor | np.ndarray, task: Task) -> bool:
    """Whether ``labels`` are soft labels of ``task``: floats ``(N, C)`` for a multiclass task,
    floats ``(N,)`` (or ``(N, 1)``, ``(N, 2)``) for a binary task.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> task = Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])
        >>> is_soft_label(torch.tensor([[0.2, 0.3, 0.5]]), task), is_soft_label(
        ...     torch.tensor([2]), task)
        (True, False)
    """
    if not _is_float(labels):
        return False
    if task.task_type == "multiclass":
        return labels.ndim == 2
    if task.task_type == "binary":
        return labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] in (1, 2))
    return False


def head_width(task: Task) -> int | None:
    """The number of outputs of the task's head, when its module says so (``nn.Linear`` or an
    ``nn.Sequential`` ending in one); ``None`` when only a forward pass would tell."""
    module: Any = task.module_pool[task.op_sequence[-1].module_name]
    while isinstance(module, torch.nn.Sequential) and len(module) > 0:
        module = module[-1]
    width = getattr(module, "out_features", None)
    return width if isinstance(width, int) else None


def soft_label_problems(
    labels: torch.Tensor | np.ndarray, task: Task, where: str, n_outputs: int | None = None
) -> list[str]:
    """Every problem of one soft label tensor (NaN, negative or above 1, a multiclass row not
    summing to 1, a width unlike the head's), each naming ``where``, the task and the first bad
    row; rows whose every entry is the ignore value are skipped.

    Args:
        labels: Soft labels (see :func:`is_soft_label`).
        task: The task they label.
        where: Names the dataset and split, e.g. ``"dataset 'news' (train)"``.
        n_outputs: Outputs of the task's head, when known (a forward pass tells).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
        >>> rows = torch.tensor([[0.5, 0.5], [0.7, 0.7]])
        >>> soft_label_problems(rows, task, "dataset 'd' (train)")  # doctest: +ELLIPSIS
        ["dataset 'd' (train), task 't': soft label row 1 sums to 1.4, not 1 (tolerance ...)..."]
    """
    t = torch.as_tensor(labels).detach().cpu().double()
    who = f"{where}, task '{task.name}'"
    if task.task_type == "binary" and t.ndim == 2 and t.shape[1] == 2:
        return [
            f"{who}: a binary task takes soft labels as (N,) probabilities of the positive class"
            f" (one logit per row), got shape {tuple(t.shape)}; pass labels[:, 1], or make the"
            " task multiclass with a 2-unit head"
        ]
    rows = t.reshape(len(t), -1)
    keep = torch.as_tensor(active_rows(rows, task.ignore_value))
    problems: list[str] = []
    width = n_outputs if n_outputs is not None else head_width(task)
    if task.task_type == "multiclass" and width is not None and rows.shape[1] != width:
        problems.append(
            f"{who}: soft labels have {rows.shape[1]} columns, the head outputs {width} classes;"
            " give one probability per class"
        )
    checks = [
        (torch.isnan(rows).any(1), "holds NaN probabilities"),
        ((rows < 0).any(1), "holds a negative probability"),
        ((rows > 1).any(1), "holds a probability above 1"),
    ]
    if task.task_type == "multiclass":
        off = (rows.sum(1) - 1).abs() > TOLERANCE
        checks.append((off & ~torch.isnan(rows).any(1), "sums to {sum:.6g}, not 1"))
    for bad, what in checks:
        bad = bad & keep
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            row = [round(v, 6) for v in rows[i].tolist()]
            text = what.format(sum=float(rows[i].sum()))
            tolerance = f" (tolerance {TOLERANCE})" if "sums" in what else ""
            shown = row if len(row) > 1 else row[0]
            fix = "; normalise the rows: labels / labels.sum(1, keepdims=True)" * bool(tolerance)
            problems.append(f"{who}: soft label row {i} {text}{tolerance}: {shown}{fix}")
    return problems


def renormalised(labels: torch.Tensor, ignore_value: float | int | None) -> torch.Tensor:
    """Multiclass soft labels ``(N, C)`` whose rows sum to within :data:`TOLERANCE` of 1,
    divided by their sums (so rows written rounded sum to 1 exactly); other rows (ignored, NaN
    or further off, which the checks name) are returned unchanged.

    Example:
        >>> import torch
        >>> rows = torch.tensor([[0.1429] * 7, [-1.0] * 7])  # 1/7 to 4 decimals sums to 1.0003
        >>> out = renormalised(rows, -1)
        >>> round(float(out[0].sum()), 6), out[1].tolist() == rows[1].tolist()
        (1.0, True)
    """
    rows = labels.double()
    sums = rows.sum(1, keepdim=True)
    keep = torch.as_tensor(active_rows(rows, ignore_value))
    near = (sums.squeeze(1) - 1).abs() <= TOLERANCE
    fix = keep & near & torch.isfinite(rows).all(1)
    return torch.where(fix[:, None], rows / sums, rows).to(labels.dtype)


def hard_targets(golds: np.ndarray, task: Task) -> np.ndarray:
    """The class ids metrics score soft labels against: the argmax of each row (ties to the
    lowest class; binary: 1 when the probability is above 0.5), ignored rows keep the ignore
    value.

    Example:
        >>> import numpy as np
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
        >>> hard_targets(np.array([[0.2, 0.8], [0.5, 0.5], [-1.0, -1.0]]), task).tolist()
        [1, 0, -1]
    """
    g = np.asarray(golds)
    rows = g.reshape(len(g), -1)
    keep = np.asarray(active_rows(rows, task.ignore_value), dtype=bool)
    binary = task.task_type == "binary"
    hard = (rows[:, -1] > 0.5 if binary else rows.argmax(axis=1)).astype(np.int64)
    ignore = task.ignore_value
    if keep.all() or ignore is None:
        return hard
    if isinstance(ignore, int):
        hard[~keep] = ignore
        return hard
    out = hard.astype(np.float64)  # a float ignore value (NaN): float class ids
    out[~keep] = ignore
    return out


__all__ = [
    "TOLERANCE",
    "hard_targets",
    "head_width",
    "is_soft_label",
    "renormalised",
    "soft_label_problems",
]
