"""Prediction and scoring of a model (``MultitaskClassifier.predict``, ``score`` and
``score_predictions``); ``remap_labels`` sends a label to another task's head or drops it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtlgraph._io import move_to_device
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.exceptions import DataError, GraphError
from mtlgraph.graph.labels import label_problems
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.slices import SLICE_SEP, SliceFunc, resolve_slices, slice_mask
from mtlgraph.graph.soft_labels import hard_targets, is_soft_label, soft_label_problems
from mtlgraph.graph.task import Task, unknown_label_error, unknown_tasks_error
from mtlgraph.inference.protocol import Batches, InferenceModel, eval_mode
from mtlgraph.metrics import make_key

SLICE_KIND = "slice:"
"""Prefix of a :func:`predict` result's slice masks: ``result["slice:<name>"][task]``."""


def unlabelled_error(dataloader: object, tasks: Mapping[str, Task]) -> GraphError:
    """The error for predicting (or scoring) a loader whose batches carry no labels."""
    return GraphError(
        [
            f"{_where(dataloader, 'the loader')} has no labels, so there is nothing to score "
            "and no task to predict; pass "
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


def _where(dataloader: object, unnamed: str = "a batch") -> str:
    """``dataset 'name' (split)`` of a loader, for messages."""
    ds = getattr(dataloader, "dataset", None)
    name, split = getattr(ds, "name", None), getattr(ds, "split", None)
    return f"dataset '{name}' ({split})" if name is not None else unnamed


def _width(out: object) -> int | None:
    """A head's output width: the last dimension of a 2-D tensor, else ``None``."""
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else None


def _add_slices(
    into: dict[str, dict[str, list[np.ndarray]]],
    slices: Mapping[str, SliceFunc],
    X: Mapping[str, Any],
    Y: Mapping[str, torch.Tensor],
    pairs: Sequence[tuple[str | None, str]],
    where: str,
) -> None:
    """Append each slice's mask of one batch under every labelled task of the batch."""
    labelled = [(label, t) for label, t in pairs if label is not None]
    if not labelled:
        return
    n_rows = len(Y[labelled[0][0]])
    for name, fn in slices.items():
        mask = slice_mask(name, fn, X, n_rows, where)
        for _, task_name in labelled:
            into.setdefault(SLICE_KIND + name, {}).setdefault(task_name, []).append(mask)


class _BatchLabels:
    """The per-batch label check of ``predict`` on a loader over a stream or another map-style
    dataset; a loader over a ``DictDataset`` or a bare iterable is not checked here.
    The heads' widths come from the batch's own outputs, so it costs no forward pass."""

    def __init__(self, dataloader: object, where: str) -> None:
        ds = getattr(dataloader, "dataset", None)
        self.on = ds is not None and not isinstance(ds, DictDataset)
        self.where, self.batch, self.start = where, 0, 0

    def __call__(
        self,
        tasks: Mapping[str, Task],
        Y: Mapping[str, torch.Tensor],
        pairs: Sequence[tuple[str | None, str]],
        outputs: Mapping[str, Any],
    ) -> None:
        """Raise a ``DataError`` naming dataset, split, task, batch, value and row."""
        labelled = [(label, t) for label, t in pairs if label is not None]
        if not self.on or not labelled:
            return
        where = f"{self.where}, batch {self.batch} (from example {self.start})"
        self.batch += 1
        self.start += len(Y[labelled[0][0]])
        problems: list[str] = []
        for label, t in labelled:
            problems += label_problems(
                tasks[t], Y[label], _width(outputs[t]), f"{where}, task '{t}'"
            )
        if problems:
            n = len(problems)
            raise DataError(problems, header=f"labels that do not fit their tasks ({n}):")


@torch.no_grad()
def predict(
    model: InferenceModel,
    dataloader: Batches,
    return_preds: bool = False,
    remap_labels: Mapping[str, str | None] | None = None,
    task_names: Sequence[str] | None = None,
    slices: Mapping[str, SliceFunc] | Sequence[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """See :meth:`MultitaskClassifier.predict`."""
    slice_funcs = resolve_slices(slices)  # slice masks beside the golds
    masks: dict[str, dict[str, list[np.ndarray]]] = {}
    where = _where(dataloader)
    tasks = model.tasks
    remap = dict(remap_labels or {})
    wanted = None if task_names is None else list(task_names)
    unknown = [t for t in wanted or [] if t not in tasks]
    if unknown:
        raise unknown_tasks_error(unknown, tasks)
    if wanted is not None and not remap:  # serving: one plan for every batch
        return _predict_named(model, dataloader, wanted, return_preds)
    device = model.device
    golds: dict[str, list[torch.Tensor]] = {}
    probs: dict[str, list[torch.Tensor]] = {}
    unlabelled = 0  # batches without any label (nothing to predict unless task_names says)
    check = _BatchLabels(dataloader, where)
    with eval_mode(model):
        for X, Y in dataloader:
            if wanted is None and not Y:
                unlabelled += 1
                continue
            pairs = _batch_pairs(tasks, Y, remap, wanted)
            if not pairs:
                continue
            if slice_funcs:
                _add_slices(masks, slice_funcs, X, Y, pairs, where)
            plan = model.plan(t for _, t in pairs)
            cache = model.execute(plan, move_to_device(X, device))
            check(tasks, Y, pairs, {t: cache[plan.outputs[t]] for _, t in pairs})
            for label, task_name in pairs:
                task = tasks[task_name]
                p = _task_output(task_name, task.output_func, cache[plan.outputs[task_name]])
                probs.setdefault(task_name, []).append(p.detach().float().cpu())
                if label is not None:
                    golds.setdefault(task_name, []).append(Y[label].cpu())
    if unlabelled and not probs:
        raise unlabelled_error(dataloader, tasks)
    result = _result(tasks, golds, probs, return_preds)
    for kind, by_task in masks.items():  # "slice:<name>" -> task -> mask over golds' rows
        result[kind] = {t: np.concatenate(v) for t, v in by_task.items()}
    return result


def _result(
    tasks: Mapping[str, Task],
    golds: Mapping[str, list[torch.Tensor]],
    probs: Mapping[str, list[torch.Tensor]],
    return_preds: bool,
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`predict`'s result from the batches' golds and output values."""
    result = {
        "golds": {t: torch.cat(v).numpy() for t, v in golds.items()},
        "probs": {t: torch.cat(v).numpy() for t, v in probs.items() if v},
    }
    if return_preds:
        result["preds"] = {
            t: tasks[t].predictions(torch.from_numpy(p)).numpy() for t, p in result["probs"].items()
        }
    return result


def _task_output(task_name: str, output_func: Any, value: Any) -> torch.Tensor:
    """``output_func(value)``; an error from it gets a note naming the task."""
    try:
        return output_func(value)
    except Exception as e:
        e.add_note(f"mtlgraph: raised by the output_func of task '{task_name}'")
        raise


def check_soft_labels(tasks: Mapping[str, Task], loaders: Sequence[DictDataLoader]) -> None:
    """Every problem of the loaders' soft labels at once.

    Raises:
        DataError: Rows that are no distribution, NaN, a width that does not match the head.
    """
    problems: list[str] = []
    for loader in loaders:
        ds = loader.dataset
        for label, labels in getattr(ds, "Y_dict", {}).items():
            task = tasks.get(label)
            if task is not None and is_soft_label(labels, task):
                where = f"dataset '{ds.name}' ({ds.split})"
                problems += soft_label_problems(labels, task, where)
    if problems:
        raise DataError(problems, header="invalid soft labels:" if len(problems) > 1 else None)


def score(
    model: InferenceModel,
    dataloaders: DictDataLoader | Sequence[DictDataLoader],
    remap_labels: Mapping[str, str | None] | None = None,
    slices: Mapping[str, SliceFunc] | Sequence[str] | None = None,
) -> dict[str, float]:
    """See :meth:`MultitaskClassifier.score`."""
    loaders = [dataloaders] if isinstance(dataloaders, DictDataLoader) else list(dataloaders)
    check_soft_labels(model.tasks, loaders)
    slice_funcs = resolve_slices(slices)
    scores: dict[str, float] = {}
    for loader in loaders:
        result = predict(
            model, loader, return_preds=True, remap_labels=remap_labels, slices=slice_funcs
        )
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
        if is_soft_label(golds, task):  # metrics score against the argmax of soft labels
            golds = hard_targets(golds, task)
        preds, probs = result["preds"][task_name], result["probs"][task_name]
        parts = [(dataset_name, golds, preds, probs)]
        for kind in sorted(k for k in result if k.startswith(SLICE_KIND)):
            mask = result[kind].get(task_name)
            if mask is not None:  # "<dataset>:<slice>"; an empty slice scores NaN
                name = f"{dataset_name}{SLICE_SEP}{kind[len(SLICE_KIND) :]}"
                parts.append((name, golds[mask], preds[mask], probs[mask]))
        for part_name, g, p, pr in parts:
            for metric, value in task.scorer.score(g, p, pr, task.ignore_value).items():
                key = make_key(task_name, part_name, split, metric)
                if key in scores:
                    raise GraphError(
                        [
                            f"two loaders produce the key '{key}'; give their datasets "
                            "different names or splits"
                        ]
                    )
                scores[key] = value
    return scores


@torch.no_grad()
def iter_predictions(
    model: InferenceModel, batches: Batches, task_names: Sequence[str]
) -> Iterator[tuple[Mapping[str, Any], dict[str, torch.Tensor]]]:
    """Stream predictions batch by batch: ``(X_dict, {task: output_func values})``.

    ``Y_dict`` is ignored; only the tasks' operations run, in evaluation mode, one batch at a time.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> model = MultitaskClassifier(
        ...     [Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])]
        ... )
        >>> batches = [({"x": torch.randn(4, 2)}, {}), ({"x": torch.randn(1, 2)}, {})]
        >>> [p["t"].shape[0] for _, p in iter_predictions(model, batches, ["t"])]
        [4, 1]
    """
    plan = model.plan(task_names)  # unknown tasks: a GraphError, before the first batch
    outputs = _output_funcs(model, plan)
    device = model.device
    with eval_mode(model):
        for X, _ in batches:
            yield X, _outputs(model, plan, outputs, _on(X, device))


def _output_funcs(model: InferenceModel, plan: ExecutionPlan) -> list[tuple[str, int, Any]]:
    """``(task, output node, output_func)`` for each task of a plan."""
    return [(t, plan.outputs[t], model.tasks[t].output_func) for t in plan.task_names]


def _outputs(
    model: InferenceModel,
    plan: ExecutionPlan,
    outputs: Sequence[tuple[str, int, Any]],
    X: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Run a plan on one batch (already on the device); task -> float32 CPU output values."""
    cache = model.execute(plan, X)
    out: dict[str, torch.Tensor] = {}
    for task_name, node, output_func in outputs:
        p = _task_output(task_name, output_func, cache[node])
        # under no_grad nothing needs detaching; convert only what is not float32 on the CPU
        out[task_name] = p if p.is_cpu and p.dtype is torch.float32 else p.float().cpu()
    return out


def _on(X: Mapping[str, Any], device: torch.device) -> Mapping[str, Any]:
    """The batch on the device: as it is when the device is the CPU and every field is a CPU
    tensor (the serving loop's common case, checked without building device objects)."""
    if device.type == "cpu" and all(isinstance(v, torch.Tensor) and v.is_cpu for v in X.values()):
        return X
    return move_to_device(X, device)


@torch.no_grad()
def _predict_named(
    model: InferenceModel, dataloader: Batches, task_names: Sequence[str], return_preds: bool
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`predict` of named tasks without remapping: one plan for every batch, labelled
    or not (the serving path, kept as lean as a hand-written loop)."""
    plan = model.plan(task_names)
    outputs = _output_funcs(model, plan)
    device = model.device
    probs: dict[str, list[torch.Tensor]] = {t: [] for t in plan.task_names}
    golds: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model):
        for X, Y in dataloader:
            for t, p in _outputs(model, plan, outputs, _on(X, device)).items():
                probs[t].append(p)
                if t in Y:
                    golds.setdefault(t, []).append(Y[t].cpu())
    return _result(model.tasks, golds, probs, return_preds)


@torch.no_grad()
def head_widths(
    model: InferenceModel, X_dict: Mapping[str, Any], task_names: Iterable[str]
) -> dict[str, int | None]:
    """The last dimension of each task's output on ``X_dict`` (``None``: not a 2-D tensor).

    Runs in evaluation mode without gradients and leaves torch's random state as it was.
    """
    names = list(task_names)
    plan = model.plan(names)
    try:
        only = [module for _, module, _ in plan.steps]
        with eval_mode(model, only), torch.random.fork_rng(devices=[]):
            cache = model.execute(plan, move_to_device(X_dict, model.device))
    except Exception as e:
        e.add_note(
            f"mtlgraph: while running tasks {names} on a dataset's first rows to check their "
            "labels; check the modules' sizes"
        )
        raise
    return {name: _width(cache[plan.outputs[name]]) for name in names}
