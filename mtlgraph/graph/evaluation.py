"""Prediction and scoring of a :class:`~mtlgraph.MultitaskClassifier` (the bodies of its
``predict``, ``score`` and ``score_predictions`` methods).

Which task predicts a batch's label is the label's own task, unless ``remap_labels`` sends it to
another task's head (cross-task evaluation) or drops it (``None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtlgraph._io import move_to_device
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader
from mtlgraph.exceptions import GraphError
from mtlgraph.metrics import make_key

if TYPE_CHECKING:
    from mtlgraph.graph.model import MultitaskClassifier
    from mtlgraph.graph.task import Task

Batches = Iterable[tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]]
"""Batches ``(X_dict, Y_dict)``: a loader or any iterable of them."""


def unknown_tasks_error(unknown: Iterable[str], tasks: Mapping[str, Task]) -> GraphError:
    """The error for task names a model does not hold, each with a suggestion."""
    return GraphError(
        [
            f"unknown task '{t}'{did_you_mean(t, tasks)}; the model has {quoted(tasks)}"
            for t in unknown
        ]
    )


def unknown_label_error(label: str, tasks: Mapping[str, Task]) -> GraphError:
    """The error for a batch label that names no task of the model."""
    return GraphError(
        [
            f"label '{label}' names no task of the model{did_you_mean(label, tasks)}; "
            f"the model has {quoted(tasks)}. Pass "
            f"remap_labels={{'{label}': <task or None>}} to score it with another task's "
            "head or to drop it"
        ]
    )


def unlabelled_error(dataloader: object, tasks: Mapping[str, Task]) -> GraphError:
    """The error for predicting (or scoring) a loader whose batches carry no labels."""
    ds: Any = getattr(dataloader, "dataset", None)
    name = f"dataset '{ds.name}' ({ds.split})" if hasattr(ds, "split") else "the loader"
    return GraphError(
        [
            f"{name} has no labels, so there is nothing to score and no task to predict; pass "
            f"task_names=[...] to predict (the model has {quoted(tasks)})"
        ]
    )


def label_tasks(
    tasks: Mapping[str, Task], labels: Iterable[str], remap: Mapping[str, str | None]
) -> list[tuple[str, str]]:
    """``(label, task)`` pairs: the task that predicts each label (dropped labels left out)."""
    pairs: list[tuple[str, str]] = []
    used: dict[str, str] = {}
    for label in labels:
        task_name = remap.get(label, label)
        if task_name is None:
            continue
        if task_name not in tasks:
            if label in remap:
                raise GraphError(
                    [
                        f"remap_labels maps '{label}' to unknown task '{task_name}'"
                        f"{did_you_mean(task_name, tasks)}"
                    ]
                )
            raise unknown_label_error(label, tasks)
        if task_name in used:
            raise GraphError(
                [
                    f"labels '{used[task_name]}' and '{label}' both map to task '{task_name}'; "
                    "remap one of them to None"
                ]
            )
        used[task_name] = label
        pairs.append((label, task_name))
    return pairs


def _batch_pairs(
    tasks: Mapping[str, Task],
    Y: Mapping[str, torch.Tensor],
    remap: Mapping[str, str | None],
    wanted: Sequence[str] | None,
) -> list[tuple[str | None, str]]:
    """``(label or None, task)`` for one batch: its labels' tasks, or the ``wanted`` tasks."""
    if wanted is None:
        return list(label_tasks(tasks, Y.keys(), remap))
    labelled = {
        task: label
        for label, task in label_tasks(tasks, [y for y in Y if remap.get(y, y) in wanted], remap)
    }
    return [(labelled.get(t), t) for t in wanted]


@torch.no_grad()
def predict(
    model: MultitaskClassifier,
    dataloader: Batches,
    return_preds: bool = False,
    remap_labels: Mapping[str, str | None] | None = None,
    task_names: Sequence[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """See :meth:`MultitaskClassifier.predict`."""
    tasks = model.tasks
    remap = dict(remap_labels or {})
    wanted = None if task_names is None else list(task_names)
    unknown = [t for t in wanted or [] if t not in tasks]
    if unknown:
        raise unknown_tasks_error(unknown, tasks)
    device = model.device
    was_training = model.training
    model.eval()
    golds: dict[str, list[torch.Tensor]] = {}
    probs: dict[str, list[torch.Tensor]] = {}
    unlabelled = 0  # batches without any label (nothing to predict unless task_names says)
    try:
        for X, Y in dataloader:
            if wanted is None and not Y:
                unlabelled += 1
                continue
            pairs = _batch_pairs(tasks, Y, remap, wanted)
            if not pairs:
                continue
            plan = model.plan(t for _, t in pairs)
            cache = model.execute(plan, move_to_device(X, device))
            for label, task_name in pairs:
                try:
                    p = tasks[task_name].output_func(cache[plan.outputs[task_name]])
                except Exception as e:
                    e.add_note(f"mtlgraph: raised by the output_func of task '{task_name}'")
                    raise
                probs.setdefault(task_name, []).append(p.detach().float().cpu())
                if label is not None:
                    golds.setdefault(task_name, []).append(Y[label].cpu())
    finally:
        model.train(was_training)
    if unlabelled and not probs:
        raise unlabelled_error(dataloader, tasks)
    result: dict[str, dict[str, np.ndarray]] = {
        "golds": {t: torch.cat(v).numpy() for t, v in golds.items()},
        "probs": {t: torch.cat(v).numpy() for t, v in probs.items()},
    }
    if return_preds:
        result["preds"] = {
            t: tasks[t].predictions(torch.from_numpy(p)).numpy() for t, p in result["probs"].items()
        }
    return result


def score(
    model: MultitaskClassifier,
    dataloaders: DictDataLoader | Sequence[DictDataLoader],
    remap_labels: Mapping[str, str | None] | None = None,
) -> dict[str, float]:
    """See :meth:`MultitaskClassifier.score`."""
    loaders = [dataloaders] if isinstance(dataloaders, DictDataLoader) else list(dataloaders)
    scores: dict[str, float] = {}
    for loader in loaders:
        result = predict(model, loader, return_preds=True, remap_labels=remap_labels)
        dataset = loader.dataset
        score_predictions(model.tasks, result, dataset.name, dataset.split, into=scores)
    return scores


def score_predictions(
    tasks: Mapping[str, Task],
    result: Mapping[str, Mapping[str, np.ndarray]],
    dataset_name: str,
    split: str,
    into: dict[str, float] | None = None,
) -> dict[str, float]:
    """See :meth:`MultitaskClassifier.score_predictions`."""
    scores = {} if into is None else into
    for task_name, golds in result["golds"].items():
        task = tasks[task_name]
        metric_values = task.scorer.score(
            golds, result["preds"][task_name], result["probs"][task_name], task.ignore_value
        )
        for metric, value in metric_values.items():
            key = make_key(task_name, dataset_name, split, metric)
            if key in scores:
                raise GraphError(
                    [
                        f"two loaders produce the key '{key}'; give their datasets "
                        "different names or splits"
                    ]
                )
            scores[key] = value
    return scores
