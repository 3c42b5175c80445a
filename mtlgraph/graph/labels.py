"""Label checks of one tensor of labels, or one batch's (graph layer, so that ``predict`` and
``score`` can check streamed batches too); :mod:`mtlgraph.training.labels` says when each dataset
is checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from mtlgraph.graph.soft_labels import is_soft_label, soft_label_problems
from mtlgraph.metrics import active_mask

if TYPE_CHECKING:
    from mtlgraph.graph.task import Task
    from mtlgraph.inference.protocol import InferenceModel


def label_problems(
    task: Task, labels: torch.Tensor, width: int | None, where: str, train: bool = False
) -> list[str]:
    """The first kind of problem of ``labels`` for ``task`` (shape, non-finite, negative,
    fractional, out of range), with its first bad value and row and how many more there are.

    Args:
        task: The task.
        labels: Its labels (``(N,)`` or ``(N, L)``).
        width: The head's output size (``None``: unknown, the range checks that need it skip).
        where: The culprit's name for messages (dataset, split, task).
        train: Training labels: all of them equal to the ignore value is a problem too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> task = Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])
        >>> label_problems(task, torch.tensor([0, 2, 3, 1]), 3, "dataset 'd' (train)")
        ... # doctest: +NORMALIZE_WHITESPACE
        ["dataset 'd' (train): label 3 (row 2) is outside 0..2: the head outputs 3 classes;
          fix the label or the head's output size"]
        >>> label_problems(task, torch.tensor([0, -100]), 3, "dataset 'd' (train)")
        ... # doctest: +NORMALIZE_WHITESPACE
        ["dataset 'd' (train): label -100 (row 1) is negative and not the task's ignore value
          (-1); set Task(ignore_value=-100) to ignore such rows, or fix the label"]
    """
    if labels.is_complex():
        return [f"{where}: labels of dtype {labels.dtype} are not numbers a loss can use"]
    kind = task.task_type
    if kind == "regression":
        problems = _regression_problems(task, labels, width, where)
    elif kind == "multilabel":
        problems = _multilabel_problems(task, labels, width, where)
    elif _is_soft(task, labels):  # distributions over classes
        named = [f", task '{task.name}'", f" for task '{task.name}'"]  # said again below
        place = next((where[: -len(n)] for n in named if where.endswith(n)), where)
        return soft_label_problems(labels, task, place, width)
    elif kind == "binary":
        problems = _binary_problems(task, labels, width, where)
    else:
        problems = _multiclass_problems(task, labels, width, where)
    if train and not problems and labels.numel() and not bool(_active(task, labels).any()):
        problems.append(
            f"{where}: every training label equals the ignore value ({task.ignore_value}), so "
            "the task would never train; fix the labels or leave the task out of this dataset"
        )
    return problems


def batch_label_problems(
    model: InferenceModel,
    Y_dict: Mapping[str, torch.Tensor],
    where: str,
    widths: Mapping[str, int | None] | None = None,
) -> list[str]:
    """The problems of one batch's labels (for streaming datasets, checked per batch).

    Args:
        model: The model (labels of tasks it lacks are left to the loader checks).
        Y_dict: Task name -> the batch's labels.
        where: Names the batch in messages, e.g. ``"dataset 'd' (train), batch 17"``.
        widths: The heads' output sizes from :func:`~mtlgraph.inference.evaluation.head_widths`
            (computed once per dataset); ``None`` skips the checks that need them.
    """
    problems: list[str] = []
    for name, labels in Y_dict.items():
        task = model.tasks.get(name)
        if task is not None:
            width = None if widths is None else widths.get(name)
            problems += label_problems(task, labels, width, f"{where}, task '{name}'")
    return problems


# ---------------------------------------------------------------- per task type


def _is_soft(task: Task, labels: torch.Tensor) -> bool:
    """Soft labels (:func:`~mtlgraph.graph.soft_labels.is_soft_label`), except floating ``(N,)``
    binary labels that are all whole numbers: those are class ids (``0.``/``1.``), checked as
    such (a ``2.`` is "not 0 or 1", not "a probability above 1")."""
    if not is_soft_label(labels, task):
        return False
    if task.task_type != "binary" or labels.ndim != 1:
        return True
    finite = labels[torch.isfinite(labels)]
    return bool((finite != finite.round()).any())


def _active(task: Task, labels: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(active_mask(labels, task.ignore_value), dtype=torch.bool)


def _first(labels: torch.Tensor, bad: torch.Tensor) -> str:
    """``value (row i)`` of the first element flagged by ``bad``."""
    index = tuple(int(i) for i in torch.nonzero(bad)[0])
    value = labels[index].item()
    value = int(value) if float(value).is_integer() else value
    where = f"row {index[0]}" + (f", column {index[1]}" if len(index) > 1 else "")
    more = int(bad.sum()) - 1
    return f"{value} ({where}{f'; {more} more' if more else ''})"


def _flagged(labels: torch.Tensor, bad: torch.Tensor, where: str, says: str) -> list[str]:
    """``["<where>: label <the first flagged> <says>"]``, or ``[]`` when ``bad`` flags none."""
    return [f"{where}: label {_first(labels, bad)} {says}"] if bool(bad.any()) else []


def _common_problems(task: Task, labels: torch.Tensor, active: torch.Tensor, where: str) -> list:
    """Non-finite labels, and negative ones that are not the ignore value."""
    if labels.is_floating_point():
        says = "is not a finite number; mark missing labels with the task's ignore value "
        says += f"({task.ignore_value})"
        problems = _flagged(labels, active & ~torch.isfinite(labels), where, says)
        if problems:
            return problems
    bad = active & (labels < 0)
    value = labels[bad][0].item() if bool(bad.any()) else 0
    shown = int(value) if float(value).is_integer() else value
    says = f"is negative and not the task's ignore value ({task.ignore_value}); set "
    says += f"Task(ignore_value={shown}) to ignore such rows, or fix the label"
    return _flagged(labels, bad, where, says)


def _multiclass_problems(
    task: Task, labels: torch.Tensor, width: int | None, where: str
) -> list[str]:
    if labels.ndim != 1:
        soft = f" or soft labels of shape (N, {width})" if width is not None else ""
        return [
            f"{where}: labels of shape {tuple(labels.shape)}; a multiclass task takes class ids "
            f"of shape (N,){soft}"
        ]
    active = _active(task, labels)
    problems = _common_problems(task, labels, active, where)
    if problems:
        return problems
    if labels.is_floating_point():
        classes = "C-1" if width is None else width - 1
        says = f"is fractional; a multiclass task takes class ids 0..{classes} (soft labels are "
        problems = _flagged(labels, active & (labels != labels.round()), where, says + "(N, C))")
        if problems:
            return problems
    if width is None:
        return []
    says = f"is outside 0..{width - 1}: the head outputs {width} classes; fix the label or the "
    return _flagged(labels, active & (labels >= width), where, says + "head's output size")


def _binary_problems(task: Task, labels: torch.Tensor, width: int | None, where: str) -> list[str]:
    if width is not None and width != 1:
        return [
            f"{where}: the head of binary task '{task.name}' outputs {width} values; a binary "
            "task needs one logit: give the head 1 output (e.g. nn.Linear(h, 1)), or use "
            "task_type='multiclass'"
        ]
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        return [
            f"{where}: labels of shape {tuple(labels.shape)}; a binary task takes 0/1 labels of "
            "shape (N,) or (N, 1) (use task_type='multilabel' for (N, L))"
        ]
    return _zero_one_problems(task, labels, where)


def _multilabel_problems(
    task: Task, labels: torch.Tensor, width: int | None, where: str
) -> list[str]:
    if labels.ndim != 2:
        return [
            f"{where}: labels of shape {tuple(labels.shape)}; a multilabel task takes 0/1 labels "
            "of shape (N, L), one column per logit"
        ]
    if width is not None and labels.shape[1] != width:
        return [
            f"{where}: labels have {labels.shape[1]} columns, the head outputs {width} logits; "
            "they must match"
        ]
    return _zero_one_problems(task, labels, where)


def _zero_one_problems(task: Task, labels: torch.Tensor, where: str) -> list[str]:
    """0/1 labels (or, multilabel, probabilities in [0, 1]) apart from the ignore value."""
    active = _active(task, labels)
    problems = _common_problems(task, labels, active, where)
    if problems:
        return problems
    bad = active & (labels > 1)
    if task.task_type == "binary" and labels.is_floating_point():
        bad = bad | (active & (labels != labels.round()))
    says = f"is not 0 or 1; {task.task_type} labels are 0 or 1 (or the ignore value "
    return _flagged(labels, bad, where, f"{says}{task.ignore_value})")


def _regression_problems(
    task: Task, labels: torch.Tensor, width: int | None, where: str
) -> list[str]:
    if labels.ndim == 2 and width is not None and labels.shape[1] != width:
        return [
            f"{where}: labels have {labels.shape[1]} columns, the head outputs {width} values; "
            "they must match"
        ]
    if not labels.is_floating_point():
        return []
    bad = _active(task, labels) & torch.isinf(labels)
    says = f"is infinite; mark missing labels with the task's ignore value ({task.ignore_value})"
    return _flagged(labels, bad, where, says)
