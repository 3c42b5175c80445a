"""Label checks before training: in-memory datasets once when ``fit`` starts
(:func:`check_fit_labels`), streamed and map-style batches before their step
(:class:`BatchLabelCheck`); one tensor's checks live in :mod:`mtlgraph.graph.labels`. Rules:
docs/training.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.exceptions import DataError
from mtlgraph.graph.labels import batch_label_problems, label_problems
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.inference.evaluation import head_widths

__all__ = [
    "BatchLabelCheck",
    "batch_label_problems",
    "check_fit_labels",
    "dataset_label_problems",
    "dataset_where",
    "head_widths",
    "label_problems",
]

Where = Callable[[DictDataset, str], str]
"""Names the place of a dataset's labels of one task in messages."""


def dataset_where(ds: DictDataset, task_name: str) -> str:
    """``dataset 'd' (train), task 't'``: the default culprit of a message."""
    return f"dataset '{ds.name}' ({ds.split}), task '{task_name}'"


def dataset_label_problems(
    model: MultitaskClassifier,
    ds: DictDataset,
    where: Where = dataset_where,
    train: bool = False,
) -> list[str]:
    """Every label problem of an in-memory dataset (one forward pass on its first two rows)."""
    names = [t for t in ds.Y_dict if t in model.tasks]
    if not names or len(ds) == 0:
        return []
    widths = head_widths(model, ds.batch(slice(0, 2))[0], names)
    problems: list[str] = []
    for name in names:
        labels = ds.Y_dict[name]
        if isinstance(labels, torch.Tensor):
            problems += label_problems(
                model.tasks[name], labels, widths[name], where(ds, name), train
            )
            continue
        for start in range(0, len(labels), MAPPED_CHUNK):  # a memory map: chunk by chunk
            chunk = torch.from_numpy(np.array(labels[start : start + MAPPED_CHUNK]))
            place = f"{where(ds, name)}, rows {start}..{start + len(chunk) - 1}"
            found = label_problems(model.tasks[name], chunk, widths[name], place, False)
            if found:
                problems += found
                break  # the first bad chunk names the first bad value
    return problems


MAPPED_CHUNK = 1 << 20
"""Rows of a memory-mapped label array checked at a time (only the chunk is read into memory;
row numbers in messages count from the chunk's first row, which the message names)."""


def check_fit_labels(
    model: MultitaskClassifier,
    train: Iterable[DictDataLoader],
    evals: Iterable[DictDataLoader],
) -> None:
    """Check the labels of every in-memory (``DictDataset``) loader once, before training.

    Raises:
        DataError: Every problem, naming dataset, split, task, the bad value and its row.
    """
    problems: list[str] = []
    for dl, is_train in [*((dl, True) for dl in train), *((dl, False) for dl in evals)]:
        if isinstance(dl.dataset, DictDataset):
            problems += dataset_label_problems(model, dl.dataset, train=is_train)
    if problems:
        raise DataError(problems, header=f"labels that do not fit their tasks ({len(problems)}):")


class BatchLabelCheck:
    """Checks each training batch of the loaders :func:`check_fit_labels` leaves out (streams
    and map-style :class:`~mtlgraph.NamedDataset` loaders), before the batch's step.

    Args:
        model: The model.
        loaders: The training loaders, in the order the loop numbers them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> task = Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])
        >>> check = BatchLabelCheck(MultitaskClassifier([task]), [])
        >>> batch = ({"x": torch.zeros(2, 2)}, {"t": torch.tensor([0, 3])})
        >>> check.check(0, batch, "dataset 's' (train)")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.DataError: labels that do not fit their tasks (1):
          - dataset 's' (train), batch 0 (from example 0), task 't': label 3 (row 1) is ...
    """

    def __init__(self, model: MultitaskClassifier, loaders: Sequence[DictDataLoader]) -> None:
        self.model = model
        self.checked = [not isinstance(dl.dataset, DictDataset) for dl in loaders]
        self.names = [_loader_name(dl) for dl in loaders]
        self.widths: dict[int, dict[str, int | None]] = {}
        self.batches: dict[int, int] = {}  # batches checked per loader (in this fit)
        self.examples: dict[int, int] = {}  # examples checked per loader (in this fit)

    def __call__(self, i: int, batch: tuple[dict[str, Any], dict[str, Any]]) -> None:
        """Check batch ``batch`` of loader ``i`` (nothing for an in-memory loader)."""
        if self.checked[i]:
            self.check(i, batch, self.names[i])

    def check(self, i: int, batch: tuple[dict[str, Any], dict[str, Any]], name: str) -> None:
        """Check one batch of loader ``i`` named ``name`` in messages.

        Raises:
            DataError: Every problem of the batch's labels, naming the culprit.
        """
        X, Y = batch
        names = [t for t in Y if t in self.model.tasks]
        widths = self.widths.setdefault(i, {})
        missing = [t for t in names if t not in widths]
        if missing:
            widths.update(head_widths(self.model, X, missing))
        b, start = self.batches.get(i, 0), self.examples.get(i, 0)
        self.batches[i] = b + 1
        rows = next(iter(Y.values())).shape[0] if Y else 0
        self.examples[i] = start + int(rows)
        where = f"{name}, batch {b} (from example {start})"
        problems = batch_label_problems(self.model, Y, where, widths)
        if problems:
            n = len(problems)
            raise DataError(problems, header=f"labels that do not fit their tasks ({n}):")


def _loader_name(loader: DictDataLoader) -> str:
    ds = loader.dataset
    return f"dataset '{getattr(ds, 'name', '?')}' ({getattr(ds, 'split', '?')})"
