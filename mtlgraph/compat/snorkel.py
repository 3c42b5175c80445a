"""Snorkel 0.10's ``snorkel.classification`` API on top of mtlgraph: change one import line.

A setting mtlgraph cannot honour raises and says how Snorkel differed
(``docs/migrating-from-snorkel.md``).
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import warnings
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph._io import import_extra, load_weights_only
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader as _DictDataLoader
from mtlgraph.data.datasets import DictDataset as _DictDataset
from mtlgraph.data.schedulers import SequentialScheduler as _SequentialScheduler
from mtlgraph.data.schedulers import ShuffledScheduler as _ShuffledScheduler
from mtlgraph.exceptions import CheckpointError, ConfigError, DataError, GraphError
from mtlgraph.graph.losses import cross_entropy_with_probs
from mtlgraph.graph.model import MultitaskClassifier as _MultitaskClassifier
from mtlgraph.graph.model_file import load_model_state, read_checkpoint, state_problems
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import INPUT, InputSpec
from mtlgraph.graph.task import Operation as _Operation
from mtlgraph.graph.task import Task as _Task
from mtlgraph.inference.evaluation import check_soft_labels, score_predictions
from mtlgraph.metrics import METRICS, MetricFunc, MetricSpec
from mtlgraph.metrics import Scorer as _Scorer
from mtlgraph.training.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    load_checkpoint,
    save_checkpoint,
)
from mtlgraph.training.lr import LR_SCHEDULES
from mtlgraph.training.trainer import Trainer as _Trainer
from mtlgraph.training.writers import WRITERS, Writer, WriterContext

__all__ = [
    "DEFAULT_DATASET_NAME",
    "DEFAULT_INPUT_DATA_KEY",
    "DEFAULT_TASK_NAME",
    "DictDataLoader",
    "DictDataset",
    "MultitaskClassifier",
    "Operation",
    "Scorer",
    "SequentialScheduler",
    "ShuffledScheduler",
    "SnorkelCompatNote",
    "Task",
    "Trainer",
    "collect_flow_outputs_by_suffix",
    "cross_entropy_with_probs",
    "list_to_tensor",
    "pad_batch",
    "preds_to_probs",
    "snorkel_to_mtlgraph",
]

DEFAULT_INPUT_DATA_KEY = "input_data"
"""``DictDataset.from_tensors``'s default field name (Snorkel's)."""
DEFAULT_DATASET_NAME = "SnorkelDataset"
"""``DictDataset.from_tensors``'s default dataset name (Snorkel's)."""
DEFAULT_TASK_NAME = "task"
"""``DictDataset.from_tensors``'s default task name (Snorkel's)."""
COVERAGE = "coverage"
"""Snorkel's metric: the share of predictions other than ``-1`` (no row left out)."""

logger = logging.getLogger(__name__)


class SnorkelCompatNote(UserWarning):
    """A Snorkel argument that mtlgraph accepts but ignores (shown once per call site)."""


class DictDataset(_DictDataset):
    """Snorkel's ``DictDataset(name, split, X_dict, Y_dict)`` (mtlgraph's, with Snorkel's
    ``from_tensors`` argument names).

    Example:
        >>> import torch
        >>> from mtlgraph.compat.snorkel import DictDataset
        >>> ds = DictDataset.from_tensors(torch.zeros(3, 2), torch.tensor([0, 1, 0]), "train")
        >>> ds.name, list(ds.X_dict), list(ds.Y_dict)
        ('SnorkelDataset', ['input_data'], ['task'])
    """

    @classmethod
    def from_tensors(  # type: ignore[override]  # Snorkel's argument names and order
        cls,
        X_tensor: Any,
        Y_tensor: Any,
        split: str,
        input_data_key: str = DEFAULT_INPUT_DATA_KEY,
        task_name: str = DEFAULT_TASK_NAME,
        dataset_name: str = DEFAULT_DATASET_NAME,
    ) -> DictDataset:
        """Snorkel's ``from_tensors``: one field ``input_data_key``, one task ``task_name``."""
        return cls(dataset_name, split, {input_data_key: X_tensor}, {task_name: Y_tensor})

    def __repr__(self) -> str:
        """Snorkel's: ``DictDataset(name=d, X_keys=['x'], Y_keys=['t'])``."""
        return (
            f"DictDataset(name={self.name}, X_keys={list(self.X_dict)}, Y_keys={list(self.Y_dict)})"
        )


class DictDataLoader(_DictDataLoader):
    """Snorkel's ``DictDataLoader(dataset, collate_fn=collate_dicts, **kwargs)``.

    mtlgraph slices in-memory tensors, so a custom ``collate_fn`` is refused.
    """

    def __init__(self, dataset: _DictDataset, collate_fn: Any = None, **kwargs: Any) -> None:
        if collate_fn is not None:
            raise ConfigError(
                [
                    "DictDataLoader: collate_fn is not supported; mtlgraph slices in-memory "
                    "tensors per batch (Snorkel collated per-sample dicts). Pad or transform the "
                    "fields of the DictDataset instead"
                ]
            )
        super().__init__(dataset, **kwargs)


def pad_batch(
    batch: Sequence[torch.Tensor], max_len: int = 0, pad_value: int = 0, left_padded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Snorkel's ``pad_batch``: 1-D tensors as one ``(N, L)`` tensor and its pad mask.

    ``L`` is the longest length, or ``max_len`` when that is shorter (then sequences keep
    their first ``max_len`` values, or their last ones with ``left_padded``). The mask is 1
    where the padded tensor equals ``pad_value``, as in Snorkel.

    Example:
        >>> import torch
        >>> from mtlgraph.compat.snorkel import pad_batch
        >>> padded, mask = pad_batch([torch.tensor([1, 2]), torch.tensor([3])])
        >>> padded.tolist(), mask.tolist()
        ([[1, 2], [3, 0]], [[0, 0], [0, 1]])
    """
    longest = max(len(item) for item in batch)
    length = min(longest, max_len) if max_len > 0 else longest
    padded = batch[0].new_full((len(batch), length), pad_value)
    for i, item in enumerate(batch):
        n = min(len(item), length)
        if left_padded:
            padded[i, length - n :] = item[len(item) - n :]
        else:
            padded[i, :n] = item[:n]
    return padded, (padded == pad_value).to(padded.dtype)


def list_to_tensor(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """Snorkel's ``list_to_tensor``: scalars or same-shape tensors stacked; anything else
    flattened and padded with zeros (:func:`pad_batch`).

    Example:
        >>> import torch
        >>> from mtlgraph.compat.snorkel import list_to_tensor
        >>> list_to_tensor([torch.tensor([1, 2]), torch.tensor([3])]).tolist()
        [[1, 2], [3, 0]]
    """
    if all(t.dim() == 0 for t in items):
        return torch.stack(list(items))
    if all(t.dim() != 1 and t.shape == items[0].shape for t in items):
        return torch.stack(list(items))
    return pad_batch([t.reshape(-1) for t in items])[0]


def collect_flow_outputs_by_suffix(outputs: Mapping[str, Any], suffix: str) -> list[Any]:
    """Snorkel's helper: the outputs whose operation name ends with ``suffix``, by name.

    Example:
        >>> from mtlgraph.compat.snorkel import collect_flow_outputs_by_suffix
        >>> collect_flow_outputs_by_suffix({"b_head": 2, "a_head": 1, "c": 3}, "_head")
        [1, 2]
    """
    return [outputs[name] for name in sorted(outputs) if name.endswith(suffix)]


def preds_to_probs(preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Snorkel's ``preds_to_probs``: one-hot rows ``(N, num_classes)`` from class predictions.

    Raises:
        DataError: An abstain (negative) prediction, which has no one-hot row.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.compat.snorkel import preds_to_probs
        >>> preds_to_probs(np.array([0, 2]), 3).tolist()
        [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    preds = np.asarray(preds).reshape(-1)
    if (preds < 0).any():
        raise DataError(["Could not convert abstained vote to probability (a negative pred)"])
    return np.eye(num_classes)[preds]


class _SnorkelBatches:
    """Snorkel's ``get_batches`` on mtlgraph's batch schedulers."""

    def get_batches(
        self, dataloaders: Sequence[_DictDataLoader]
    ) -> Iterator[tuple[Any, _DictDataLoader]]:
        """One epoch's ``(batch, dataloader)`` pairs in the scheduler's order."""
        iterators = [iter(dl) for dl in dataloaders]
        plan = self.epoch_plan([len(dl) for dl in dataloaders])  # type: ignore[attr-defined]
        for step in plan:
            for i in step:
                yield next(iterators[i]), dataloaders[i]


class SequentialScheduler(_SnorkelBatches, _SequentialScheduler):
    """Snorkel's ``SequentialScheduler``: every batch of loader 0, then of loader 1, ...

    Example:
        >>> import torch
        >>> from mtlgraph.compat.snorkel import (DictDataLoader, DictDataset,
        ...                                      SequentialScheduler)
        >>> dl = DictDataLoader(DictDataset("d", "train", {"x": torch.arange(3)}, {}),
        ...                     batch_size=2)
        >>> [b[0]["x"].tolist() for b, _ in SequentialScheduler().get_batches([dl])]
        [[0, 1], [2]]
    """


class ShuffledScheduler(_SnorkelBatches, _ShuffledScheduler):
    """Snorkel's ``ShuffledScheduler``: every batch once, in an order drawn from its seed
    (Snorkel drew from Python's global ``random``)."""


class Operation(_Operation):
    """Snorkel's ``Operation(module_name, inputs, name=None)``; ``inputs=[]`` passes the
    module one dict: ``"_input_"`` (the batch) and the outputs of its task's earlier
    operations (Snorkel passed every output computed so far in the pass).

    Example:
        >>> from mtlgraph.compat.snorkel import Operation
        >>> Operation("combiner", [], name="combine").whole_outputs
        True
    """

    def __init__(
        self, module_name: str, inputs: Sequence[InputSpec], name: str | None = None
    ) -> None:
        whole = isinstance(inputs, list) and not inputs
        self.whole_outputs = whole
        super().__init__(module_name, [INPUT] if whole else inputs, name)


class OutputsDict(nn.Module):
    """Runs ``module`` on ``{name: value}`` built from its positional inputs (an
    ``Operation(..., inputs=[])``); its weights are ``module``'s, under ``.module``."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module, self.names = module, tuple(names)

    def forward(self, *values: Any) -> Any:
        return self.module(dict(zip(self.names, values, strict=True)))


class Task(_Task):
    """Snorkel's ``Task(name, module_pool, op_sequence, scorer=Scorer(metrics=["accuracy"]),
    loss_func=None, output_func=None)`` with mtlgraph's other arguments; an operation with
    ``inputs=[]`` reads ``"_input_"`` and the task's earlier operations as a dict.

    Example:
        >>> from torch import nn
        >>> from mtlgraph.compat.snorkel import Operation, Task
        >>> task = Task("t", nn.ModuleDict({"m": nn.Identity()}), [Operation("m", [])])
        >>> [i.source for i in task.op_sequence[0].inputs]
        ['_input_']
    """

    def __init__(
        self,
        name: str,
        module_pool: Mapping[str, nn.Module],
        op_sequence: Sequence[_Operation],
        scorer: _Scorer | None = None,
        loss_func: Any = None,
        output_func: Any = None,
        **kwargs: Any,
    ) -> None:
        pool, ops = _whole_outputs(name, module_pool, op_sequence)
        scorer = Scorer(metrics=["accuracy"]) if scorer is None else scorer
        super().__init__(name, pool, ops, loss_func, output_func, scorer, **kwargs)


def _whole_outputs(
    task: str, pool: Mapping[str, nn.Module], ops: Sequence[_Operation]
) -> tuple[Mapping[str, nn.Module], list[_Operation]]:
    """The pool and operations with every ``inputs=[]`` operation made explicit: it reads
    ``"_input_"`` and the earlier operations, and its module gets them as one dict."""
    whole = [i for i, op in enumerate(ops) if getattr(op, "whole_outputs", False)]
    if not whole:
        return pool, list(ops)
    new_pool, new_ops = dict(pool), list(ops)
    for i in whole:
        op = ops[i]
        earlier = [o.name for o in ops[:i]]
        others = [o.name for o in ops if o.module_name == op.module_name and o is not op]
        where = f"task '{task}': operation '{op.name}' has inputs=[] (the whole outputs dict)"
        if op.module_name not in pool:
            raise ConfigError([f"{where}; its module '{op.module_name}' is not in the pool"])
        if others:
            raise ConfigError(
                [
                    f"{where}, so its module '{op.module_name}' gets one dict and can serve no "
                    f"other operation; {quoted(others)} also use it: give them their own module"
                ]
            )
        new_pool[op.module_name] = OutputsDict(pool[op.module_name], [INPUT, *earlier])
        new_ops[i] = _Operation(op.module_name, [INPUT, *earlier], op.name)
    return new_pool, new_ops


def _device(device: int | str | torch.device) -> torch.device:
    """Snorkel's device numbers: -1 is the CPU, ``n >= 0`` CUDA device ``n`` (the CPU, with a
    logged warning, when CUDA is not available, as in Snorkel)."""
    if isinstance(device, bool) or not isinstance(device, int):
        return torch.device(device)
    if device < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning("device=%d: no CUDA device is available; using the CPU", device)
        return torch.device("cpu")
    return torch.device("cuda", device)


def _dp_free(key: str) -> str:
    """A state-dict key without ``nn.DataParallel``'s ``.module`` right after the pool name
    (``module_pool.m.module.weight`` -> ``module_pool.m.weight``)."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "module_pool" and parts[2] == "module":
        return ".".join(parts[:2] + parts[3:])
    return key


def snorkel_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A Snorkel model file's state dict with its keys renamed to ``model``'s: DataParallel's
    ``module.`` segment dropped or added where only that differs; other keys kept as they are."""
    own = model.state_dict()
    by_free = {_dp_free(k): k for k in own}
    return {(k if k in own else by_free.get(_dp_free(k), k)): v for k, v in state.items()}


class MultitaskClassifier(_MultitaskClassifier):
    """Snorkel's ``MultitaskClassifier(tasks, name=None, device=0, dataparallel=True)``.

    ``device`` is a number (``-1``: CPU); ``dataparallel`` is ignored with a note; a module name
    bound to two different modules raises (Snorkel kept the first). Labels are mapped to tasks
    as Snorkel did: a label naming no task is ignored (one ``SnorkelCompatNote``), a remapped
    label is scored under its own name, and ``load`` reads Snorkel's ``.pth`` files too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph.compat.snorkel import (DictDataLoader, DictDataset,
        ...                                      MultitaskClassifier, Operation, Task)
        >>> task = Task("t", nn.ModuleDict({"m": nn.Linear(2, 2)}),
        ...             [Operation("m", [("_input_", "x")])])
        >>> model = MultitaskClassifier([task], device=-1)
        >>> ds = DictDataset("d", "valid", {"x": torch.randn(4, 2)},
        ...                  {"t": torch.tensor([0, 1, 0, 1]), "u": torch.tensor([1, 1, 0, 0])})
        >>> sorted(model.score([DictDataLoader(ds)], remap_labels={"u": "t"}))
        ['t/d/valid/accuracy', 'u/d/valid/accuracy']
    """

    def __init__(
        self,
        tasks: Sequence[_Task],
        name: str | None = None,
        device: int | str | torch.device = 0,
        dataparallel: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ConfigError(
                [
                    f"MultitaskClassifier takes no argument '{k}'"
                    f"{did_you_mean(k, ['name', 'device', 'dataparallel'])}"
                    for k in kwargs
                ]
            )
        if dataparallel:
            warnings.warn(
                "dataparallel=True is ignored: mtlgraph trains data-parallel with DDP under "
                "torchrun (docs/distributed.md), not nn.DataParallel",
                SnorkelCompatNote,
                stacklevel=2,
            )
        self.ignored_labels: set[str] = set()  # labels naming no task, noted once each
        try:
            super().__init__(tasks, name=name, device=_device(device))
        except GraphError as e:
            if "different module objects" in str(e):
                e.add_note(
                    "mtlgraph.compat.snorkel: Snorkel kept the first module of a name silently; "
                    "mtlgraph refuses, so that two tasks never share or split weights by accident"
                )
            raise

    # Snorkel's per-task attributes, read from the tasks
    @property
    def op_sequences(self) -> dict[str, Sequence[_Operation]]:
        return {n: t.op_sequence for n, t in self.tasks.items()}

    @property
    def loss_funcs(self) -> dict[str, Any]:
        return {n: t.loss_func for n, t in self.tasks.items()}

    @property
    def output_funcs(self) -> dict[str, Any]:
        return {n: t.output_func for n, t in self.tasks.items()}

    @property
    def scorers(self) -> dict[str, _Scorer]:
        return {n: t.scorer for n, t in self.tasks.items()}

    def labels_to_tasks(
        self, labels: Iterable[str], remap_labels: Mapping[str, str | None] | None = None
    ) -> dict[str, str]:
        """Snorkel's label -> task map: ``remap_labels`` first (``None`` drops a label), then
        a label naming a task; any other label is ignored, with one note per label.

        Raises:
            GraphError: ``remap_labels`` names a task the model lacks.
        """
        remap = dict(remap_labels or {})
        out: dict[str, str] = {}
        ignored: list[str] = []
        for label in labels:
            task = remap.get(label, label)
            if task is None:
                continue
            if task in self.tasks:
                out[label] = task
            elif label in remap:
                raise GraphError(
                    [
                        f"remap_labels maps '{label}' to unknown task '{task}'"
                        f"{did_you_mean(task, self.tasks)}"
                    ]
                )
            else:
                ignored.append(label)
        new = [lb for lb in ignored if lb not in self.ignored_labels]
        if new:
            self.ignored_labels.update(new)
            warnings.warn(
                f"labels {quoted(new)} name no task of the model ({quoted(self.tasks)}): "
                "ignored, as in Snorkel (mtlgraph.MultitaskClassifier raises instead); "
                "remap_labels={label: task} scores one with a task's head",
                SnorkelCompatNote,
                stacklevel=3,
            )
        return out

    def forward(self, X_dict: Mapping[str, Any], task_names: Iterable[str]) -> dict[str, Any]:
        """Snorkel's ``forward``: the operations' outputs and ``"_input_"`` (the batch)."""
        return {INPUT: X_dict, **super().forward(X_dict, task_names)}

    def calculate_loss(
        self,
        X_dict: Mapping[str, Any],
        Y_dict: Mapping[str, torch.Tensor],
        keep_empty: bool = False,
        all_active: Container[str] = (),
        outputs: list[tuple[ExecutionPlan, dict[int, Any]]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Snorkel's ``calculate_loss``: labels naming no task are ignored (one note)."""
        known = self.labels_to_tasks(Y_dict)
        if len(known) < len(Y_dict):
            Y_dict = {label: y for label, y in Y_dict.items() if label in known}
        return super().calculate_loss(X_dict, Y_dict, keep_empty, all_active, outputs)

    def predict(  # type: ignore[override]  # Snorkel's label keys
        self,
        dataloader: _DictDataLoader,
        return_preds: bool = False,
        remap_labels: Mapping[str, str | None] | None = None,
        task_names: Sequence[str] | None = None,
        slices: Any = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Snorkel's ``predict``: results keyed by *label*, a label and its remap onto the
        same task both predicted; labels naming no task ignored (one note)."""
        Y = getattr(dataloader.dataset, "Y_dict", None)
        if Y is None:  # labels known only batch by batch (a NamedDataset): mtlgraph's rules
            return super().predict(dataloader, return_preds, remap_labels, task_names, slices)
        pairs = self.labels_to_tasks(Y, remap_labels)
        if task_names is not None or slices is not None:
            remap = {**{lb: None for lb in Y if lb not in pairs}, **pairs}
            return super().predict(dataloader, return_preds, remap, task_names, slices)
        golds: dict[str, list[torch.Tensor]] = {label: [] for label in pairs}

        def batches() -> Iterator[tuple[Mapping[str, Any], dict[str, torch.Tensor]]]:
            for X, Yb in dataloader:
                for label in pairs:
                    golds[label].append(Yb[label].cpu())
                yield X, {}

        tasks = list(dict.fromkeys(pairs.values()))
        if not tasks:
            return {"golds": {}, "probs": {}, **({"preds": {}} if return_preds else {})}
        by_task = super().predict(batches(), return_preds, task_names=tasks)
        result = {"golds": {label: torch.cat(g).numpy() for label, g in golds.items()}}
        for kind in ("probs", "preds") if return_preds else ("probs",):
            result[kind] = {label: by_task[kind][task] for label, task in pairs.items()}
        return result

    def score(  # type: ignore[override]  # Snorkel's as_dataframe
        self,
        dataloaders: _DictDataLoader | Sequence[_DictDataLoader],
        remap_labels: Mapping[str, str | None] | None = None,
        as_dataframe: bool = False,
        slices: Any = None,
    ) -> Any:
        """Snorkel's ``score``: ``label/dataset/split/metric`` keys (a remapped label keeps its
        name), as a dict or a pandas DataFrame with ``as_dataframe=True`` (columns label,
        dataset, split, metric, score; pandas comes with ``mtlgraph[snorkel]``)."""
        loaders = [dataloaders] if isinstance(dataloaders, _DictDataLoader) else dataloaders
        scores: dict[str, float] = {}
        for loader in loaders:
            ds = loader.dataset
            Y = getattr(ds, "Y_dict", None)
            pairs = {} if Y is None else self.labels_to_tasks(Y, remap_labels)
            check_soft_labels({lb: self.tasks[t] for lb, t in pairs.items()}, [loader])
            result = self.predict(loader, True, remap_labels, slices=slices)
            tasks = {label: self.tasks[task] for label, task in pairs.items()}
            if slices is not None or Y is None:  # mtlgraph's results: keyed by task
                tasks = dict(self.tasks)
            score_predictions(tasks, result, ds.name, ds.split, into=scores)
        if not as_dataframe:
            return scores
        (pd,) = import_extra("score(as_dataframe=True)", "snorkel", "pandas")
        rows = [[*key.split("/", 3), value] for key, value in scores.items()]
        return pd.DataFrame(rows, columns=["label", "dataset", "split", "metric", "score"])

    def load(self, path: str | os.PathLike[str], strict: bool = True) -> None:
        """Load an mtlgraph model file or checkpoint, or a Snorkel model file (``.pth``, with
        or without DataParallel's ``module.`` prefixes), all or nothing.

        As in Snorkel, only the parameter names count: a file saved under other task names
        loads when its modules match.

        Raises:
            FileNotFoundError: No such file.
            CheckpointError: Neither kind of model file, or weights that do not match.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {os.fspath(path)!r} does not exist")
        raw = load_weights_only(path, self.device)
        what = f"{os.fspath(path)!r}"
        if isinstance(raw, Mapping) and "format" in raw:
            state = read_checkpoint(path, self.device)["model"]
        elif isinstance(raw, Mapping) and all(isinstance(v, torch.Tensor) for v in raw.values()):
            state = snorkel_state(self, raw)  # a Snorkel model file: a bare state dict
        else:
            raise CheckpointError(
                f"{what} is neither an mtlgraph model file nor a Snorkel one (a state dict)"
            )
        hint = "pass strict=False to load the part that matches" if strict else "use its model"
        if strict and state_problems(self, state, None, strict=False):
            hint = "build the model with the modules of the file"
        load_model_state(self, {"model": state, "task_names": None}, what, strict, hint)


class Scorer(_Scorer):
    """Snorkel's ``Scorer(metrics=None, custom_metric_funcs=None, abstain_label=-1)``.

    Snorkel 0.10's rules: rows whose gold *or* prediction equals ``abstain_label`` are left out
    of every listed metric but ``coverage`` (the share of predictions other than ``-1``);
    custom metrics get every row and may return a dict of scores, merged into the result.
    ``score`` also derives missing ``preds`` from ``probs`` (argmax, ties to the lowest class).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.compat.snorkel import Scorer
        >>> golds, preds = np.array([1, 0, 1, 0, -1]), np.array([-1, -1, 1, 1, 0])
        >>> Scorer(metrics=["accuracy", "coverage"]).score(golds, preds)
        {'accuracy': 0.5, 'coverage': 0.6}
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] | None = None,
        custom_metric_funcs: Mapping[str, MetricFunc] | None = None,
        abstain_label: int | None = -1,
    ) -> None:
        names = list(metrics or [])
        unknown = [m for m in names if isinstance(m, str) and m != COVERAGE and m not in METRICS]
        if unknown:
            known = [*METRICS, COVERAGE]
            raise ConfigError(
                [f"Unrecognized metric: {m!r}{did_you_mean(m, known)}" for m in unknown]
            )
        super().__init__([m for m in names if m != COVERAGE])
        self.order = [m if isinstance(m, str) else str(m.get("key", m["name"])) for m in names]
        self.custom = dict(custom_metric_funcs or {})
        self.abstain_label = abstain_label

    @property
    def metric_keys(self) -> list[str]:
        """The listed metrics, then the custom ones (a dict-valued one adds its own keys)."""
        return [*self.order, *self.custom]

    def higher_is_better(self, key: str) -> bool:
        if key == COVERAGE:
            return True
        if key in self.custom:
            return bool(getattr(self.custom[key], "higher_is_better", True))
        return super().higher_is_better(key)

    def score(  # Snorkel's optional preds and probs
        self,
        golds: np.ndarray,
        preds: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        ignore_value: float | int | str | None = "abstain_label",
    ) -> dict[str, float]:
        """Snorkel's ``score``; ``ignore_value`` (given by a model: its task's) also masks golds.

        Raises:
            DataError: No golds (Snorkel: "Cannot score empty labels").
            ConfigError: Neither preds nor probs.
        """
        golds = np.asarray(golds)
        if len(golds) == 0:
            raise DataError(["Cannot score empty labels: golds has no rows"])
        if preds is None and probs is None:
            raise ConfigError(["Scorer.score needs preds or probs"])
        if preds is None:
            p = np.asarray(probs)
            preds = p.argmax(axis=1) if p.ndim == 2 else (p > 0.5).astype(np.int64)
        preds = np.asarray(preds)
        probs = preds if probs is None else np.asarray(probs)
        ignore = self.abstain_label if ignore_value == "abstain_label" else ignore_value
        keep = np.ones(len(golds), dtype=bool)
        if self.abstain_label is not None and golds.ndim == 1 and preds.ndim == 1:
            keep = (golds != self.abstain_label) & (preds != self.abstain_label)
        listed = super().score(golds[keep], preds[keep], probs[keep], ignore)  # type: ignore[arg-type]
        out: dict[str, float] = {}
        for key in self.order:
            out[key] = float(np.mean(preds != -1)) if key == COVERAGE else listed[key]
        for key, func in self.custom.items():
            value = func(golds, preds, probs)
            if isinstance(value, Mapping):
                out.update({str(k): float(v) for k, v in value.items()})
            else:
                out[key] = float(value)
        return out


# ---------------------------------------------------------------- the Trainer

_SNORKEL_DEFAULTS: dict[str, Any] = {
    "seed": None,
    "n_epochs": 1,
    "lr": 0.01,
    "l2": 0.0,
    "grad_clip": 1.0,
    "train_split": "train",
    "valid_split": "valid",
    "test_split": "test",
    "progress_bar": True,
    "log_manager_config": {},
    "checkpointing": False,
    "checkpointer_config": {},
    "logging": False,
    "log_writer": "tensorboard",
    "log_writer_config": {},
    "optimizer": "adam",
    "optimizer_config": {},
    "lr_scheduler": "constant",
    "lr_scheduler_config": {},
    "batch_scheduler": "shuffled",
}
"""Snorkel 0.10's ``TrainerConfig`` keys and defaults (nested configs default to Snorkel's)."""

_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},  # Snorkel's sgd_config default
    "adam": {"amsgrad": False, "betas": (0.9, 0.999)},
    "adamax": {"betas": (0.9, 0.999), "eps": 1e-8},
}


def _unknown(section: str, keys: Sequence[str], known: Sequence[str]) -> list[str]:
    return [
        f"{section}: unknown key '{k}'{did_you_mean(k, known)}; Snorkel 0.10 knows {quoted(known)}"
        for k in keys
        if k not in known
    ]


def _optimizer(name: str, config: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    problems += _unknown(
        "optimizer_config", list(config), [f"{n}_config" for n in _OPTIMIZER_DEFAULTS]
    )
    kwargs = dict(_OPTIMIZER_DEFAULTS.get(name, {}))
    kwargs.update(config.get(f"{name}_config", {}))
    return {"name": name, **{k: tuple(v) if k == "betas" else v for k, v in kwargs.items()}}


def _lr_schedule(
    name: str, config: Mapping[str, Any], lr: float, problems: list[str]
) -> dict[str, Any]:
    """``lr_scheduler`` and ``lr_scheduler_config`` as mtlgraph settings: Snorkel stepped its
    schedules after every batch (``unit="steps"``) and clamped them at ``min_lr``."""
    known = [
        "warmup_steps",
        "warmup_unit",
        "warmup_percentage",
        "min_lr",
        "exponential_config",
        "step_config",
    ]
    problems += _unknown("lr_scheduler_config", list(config), known)
    min_lr = float(config.get("min_lr", 0.0))
    if min_lr > lr:
        problems.append(
            f"lr_scheduler_config.min_lr: {min_lr} is above lr={lr}; Snorkel raised the "
            f"learning rate to min_lr after the first step. Set lr={min_lr}, or a min_lr "
            "below lr"
        )
    floor = {"min_factor": min_lr / lr} if min_lr and lr > 0 else {}
    schedule: str | dict[str, Any] = name
    if name == "linear":  # Snorkel's falls to 0 at the last step, clamped at min_lr
        schedule = {"name": "linear", **floor}
    elif name == "exponential":
        gamma = {"gamma": 0.9, **config.get("exponential_config", {})}
        schedule = {"name": "exponential", "unit": "steps", **gamma, **floor}
    elif name == "step":
        params = {"gamma": 0.9, "step_size": 5, **config.get("step_config", {})}
        schedule = {"name": "step", "unit": "steps", **params, **floor}
    if name in ("exponential", "step"):  # a typo in its config, named where Snorkel had it
        problems += LR_SCHEDULES.problems(schedule, f"lr_scheduler_config.{name}_config")
    out: dict[str, Any] = {"lr_scheduler": schedule}
    steps, unit = config.get("warmup_steps", 0), config.get("warmup_unit", "batches")
    if steps and unit == "epochs":
        out["warmup_epochs"] = float(steps)
    elif steps and unit == "batches":
        out["warmup_steps"] = int(steps)
    elif steps:
        problems.append(f"lr_scheduler_config.warmup_unit: 'batches' or 'epochs', got {unit!r}")
    if config.get("warmup_percentage") and not steps:  # Snorkel: ignored when steps are set
        out["warmup_fraction"] = float(config["warmup_percentage"])
    return out


_CHECKPOINTER_KEYS = [
    f"checkpoint_{k}" for k in ("dir", "factor", "metric", "task_metrics", "runway", "clear")
]


class LogDirWriter(Writer):
    """A built-in writer (``"jsonl"`` or ``"tensorboard"``) in a directory of its own:
    Snorkel's ``log_dir/run_name`` beside ``checkpoint_dir``. Opened by the compat
    :class:`Trainer` before each ``fit`` (or on first use), as the run directory's would be.
    """

    def __init__(self, name: str, directory: str | os.PathLike[str]) -> None:
        self.name, self.directory = name, Path(directory)
        self.writer: Writer | None = None

    def open(self, resume_step: int | None) -> None:
        """Open the writer for a fresh run (``None``) or a run resumed after ``resume_step``."""
        self.close()
        ctx = WriterContext(self.directory, resume_step)
        self.writer = WRITERS.build(self.name, "writers", ctx=ctx)

    def write(self, record: Mapping[str, float]) -> None:
        if self.writer is None:
            self.open(None)
        assert self.writer is not None
        self.writer.write(record)

    def close(self, final: Mapping[str, float] | None = None) -> None:
        if self.writer is not None:
            self.writer.close(final)
            self.writer = None

    def __repr__(self) -> str:
        return f"LogDirWriter({self.name!r}, {os.fspath(self.directory)!r})"


def _log_dir(log_cfg: Mapping[str, Any]) -> Path:
    """Snorkel's ``log_dir/run_name``; without a run name, ``log_dir/<date>/<time>``."""
    if log_cfg.get("run_name"):
        return Path(log_cfg.get("log_dir", "logs")) / str(log_cfg["run_name"])
    now = datetime.datetime.now()
    stamp = Path(now.strftime("%Y_%m_%d")) / now.strftime("%H_%M_%S")
    return Path(log_cfg.get("log_dir", "logs")) / stamp


def _evaluation(manager: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``log_manager_config`` as ``evaluation_unit`` and ``evaluation_freq``."""
    unit = manager.get("counter_unit", "epochs")
    freq = manager.get("evaluation_freq", 1.0)
    if unit not in ("epochs", "batches"):
        problems.append(
            f"log_manager_config.counter_unit: {unit!r} has no mtlgraph equivalent; use "
            "'epochs' or 'batches' (mtlgraph counts optimizer steps, not data points)"
        )
    if float(freq) != int(freq) or freq < 1:
        problems.append(f"log_manager_config.evaluation_freq: a whole number >= 1, got {freq}")
    return {
        "evaluation_unit": "steps" if unit == "batches" else "epochs",
        "evaluation_freq": int(freq),
    }


def _checkpoints(ckpt_cfg: Mapping[str, Any], freq: int, problems: list[str]) -> dict[str, Any]:
    """``checkpointer_config`` as mtlgraph's checkpoint settings."""
    out: dict[str, Any] = {"run_dir": ckpt_cfg.get("checkpoint_dir", "checkpoints")}
    if out["run_dir"] is None:
        problems.append(
            "checkpointer_config.checkpoint_dir: None; Snorkel failed on it too (a TypeError "
            "when the Checkpointer was built). Give a directory (Snorkel's default is "
            "'checkpoints')"
        )
    out["checkpoint_every"] = freq * int(ckpt_cfg.get("checkpoint_factor", 1))
    metric, _, mode = str(ckpt_cfg.get("checkpoint_metric", "model/all/train/loss:min")).rpartition(
        ":"
    )
    out["checkpoint_metric"], out["checkpoint_mode"] = metric, mode
    if ckpt_cfg.get("checkpoint_task_metrics"):
        problems.append(
            "checkpointer_config.checkpoint_task_metrics: mtlgraph keeps best.pt for one "
            "metric (checkpoint_metric) and last.pt; save others from trainer.history"
        )
    if not ckpt_cfg.get("checkpoint_clear", True):
        problems.append(
            "checkpointer_config.checkpoint_clear: False (keep every checkpoint) is not "
            "supported; mtlgraph keeps last.pt and best.pt, as Snorkel's default True kept the best"
        )
    if ckpt_cfg.get("checkpoint_runway"):
        problems.append(
            "checkpointer_config.checkpoint_runway: not supported; mtlgraph considers every "
            "evaluation for best.pt"
        )
    return out


def _run_dir(cfg: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``logging``, ``log_writer``, ``checkpointing`` and their configs: checkpoints in
    ``checkpoint_dir/checkpoints/``, logs in ``log_dir/run_name``, each where Snorkel put it."""
    log_cfg, ckpt_cfg = dict(cfg["log_writer_config"]), dict(cfg["checkpointer_config"])
    manager = dict(cfg["log_manager_config"])
    problems += _unknown("log_writer_config", list(log_cfg), ["log_dir", "run_name"])
    problems += _unknown("log_manager_config", list(manager), ["counter_unit", "evaluation_freq"])
    problems += _unknown("checkpointer_config", list(ckpt_cfg), _CHECKPOINTER_KEYS)
    out = _evaluation(manager, problems)
    writers: list[Any] = []  # Snorkel wrote no logs without logging=True
    if cfg["logging"]:
        writer = cfg["log_writer"]
        if writer not in ("json", "tensorboard"):
            problems.append(f"log_writer: 'json' or 'tensorboard', got {writer!r}")
        name = "jsonl" if writer == "json" else "tensorboard"
        out["run_dir"], writers = os.fspath(_log_dir(log_cfg)), [name]
    if cfg["checkpointing"]:
        log_dir = out.get("run_dir")
        out.update(_checkpoints(ckpt_cfg, out["evaluation_freq"], problems))
        out["checkpoint_unit"] = out["evaluation_unit"]
        if (
            log_dir is not None
            and out["run_dir"] is not None
            and Path(log_dir) != Path(out["run_dir"])
        ):
            writers = [LogDirWriter(writers[0], log_dir)]
    out["writers"] = writers
    return out


def snorkel_to_mtlgraph(config: Mapping[str, Any]) -> dict[str, Any]:
    """Snorkel 0.10 Trainer settings as mtlgraph :class:`~mtlgraph.Trainer` settings.

    Raises:
        ConfigError: Unknown Snorkel keys (with suggestions) and settings mtlgraph cannot
            honour, each saying how Snorkel differed; all at once.

    Example:
        >>> from mtlgraph.compat.snorkel import snorkel_to_mtlgraph
        >>> cfg = snorkel_to_mtlgraph({"n_epochs": 3, "l2": 0.01, "valid_split": "dev"})
        >>> cfg["weight_decay"], cfg["eval_splits"], cfg["grad_clip"], cfg["seed"]
        (0.01, ['dev'], 1.0, 0)
    """
    problems = _unknown("Trainer", list(config), list(_SNORKEL_DEFAULTS))
    cfg = {**_SNORKEL_DEFAULTS, **config}
    out: dict[str, Any] = {
        "n_epochs": cfg["n_epochs"],
        "lr": cfg["lr"],
        "weight_decay": cfg["l2"],
        "grad_clip": cfg["grad_clip"] or None,
        "train_split": cfg["train_split"],
        "eval_splits": [cfg["valid_split"]],
        "progress_bar": cfg["progress_bar"],
        "seed": 0 if cfg["seed"] is None else cfg["seed"],  # mtlgraph always seeds its run
        "batch_scheduler": cfg["batch_scheduler"],
    }
    out["optimizer"] = _optimizer(cfg["optimizer"], cfg["optimizer_config"], problems)
    out.update(_lr_schedule(cfg["lr_scheduler"], cfg["lr_scheduler_config"], cfg["lr"], problems))
    out.update(_run_dir(cfg, problems))
    if problems:
        raise ConfigError(problems, header="cannot translate this Snorkel Trainer config:")
    return out


def _known_labels(
    model: _MultitaskClassifier, dataloaders: Sequence[_DictDataLoader]
) -> list[_DictDataLoader]:
    """The loaders, each in-memory dataset without the labels that name no task of the model
    (Snorkel ignored them; a compat model notes them once)."""
    out: list[_DictDataLoader] = []
    for dl in dataloaders:
        ds = dl.dataset
        labels = list(getattr(ds, "Y_dict", {}))
        known = (
            model.labels_to_tasks(labels)
            if isinstance(model, MultitaskClassifier)
            else {lb: lb for lb in labels if lb in model.tasks}
        )
        if len(known) == len(labels) or not isinstance(ds, _DictDataset):
            out.append(dl)
            continue
        kept = _DictDataset(ds.name, ds.split, ds.X_dict, {k: ds.Y_dict[k] for k in known})
        out.append(_DictDataLoader(kept, **dl.options))
    return out


class Trainer(_Trainer):
    """Snorkel's ``Trainer(name=None, **config)`` with Snorkel 0.10's settings.

    Settings go through :func:`snorkel_to_mtlgraph`; with ``checkpointing=True`` the model holds
    the best checkpoint's weights after ``fit``, as in Snorkel. ``fit(..., resume_from=...)``
    continues an interrupted run from its checkpoints exactly; :meth:`save` writes the last
    run's state and :meth:`load` arms the next ``fit`` to continue it.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from mtlgraph.compat.snorkel import (DictDataLoader, DictDataset,
        ...                                      MultitaskClassifier, Operation, Task, Trainer)
        >>> ds = DictDataset.from_tensors(torch.randn(8, 2), torch.tensor([0, 1] * 4), "train")
        >>> task = Task("task", nn.ModuleDict({"m": nn.Linear(2, 2)}),
        ...             [Operation("m", [("_input_", "input_data")])])
        >>> model = MultitaskClassifier([task], device=-1)
        >>> trainer = Trainer(n_epochs=2, progress_bar=False)
        >>> trainer.fit(model, [DictDataLoader(ds, batch_size=4)])
        >>> path = tempfile.mkdtemp() + "/trainer.pt"
        >>> trainer.save(path)
        >>> again = Trainer()
        >>> again.load(path, model=None)
        >>> again.config.n_epochs
        2
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        self.name = name if name is not None else type(self).__name__
        self.snorkel_config: dict[str, Any] = dict(kwargs)
        super().__init__(**snorkel_to_mtlgraph(kwargs))
        self.resume_from: str | os.PathLike[str] | None = None  # armed by load(path, model)
        self.last_checkpoint: Path | None = None  # last.pt of the last fit
        self.scratch: tempfile.TemporaryDirectory[str] | None = None  # fit's own run directory
        self.loaded: tempfile.TemporaryDirectory[str] | None = None  # the run load() read

    def fit(
        self,
        model: _MultitaskClassifier,
        dataloaders: Sequence[_DictDataLoader],
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train as Snorkel did; ``resume_from`` (a checkpoint file, ``checkpoint_dir`` or a
        run directory) continues an interrupted run exactly, as mtlgraph's ``fit`` does."""
        resume = resume_from if resume_from is not None else self.resume_from
        self.resume_from = None
        loaded, self.loaded = self.loaded, None  # removed once this fit is done with it
        loaders = _known_labels(model, dataloaders)
        own_dir = self.config.run_dir is None
        if own_dir:  # the run's state, for save(): a directory of its own, removed with it
            self.scratch = tempfile.TemporaryDirectory(prefix="mtlgraph-snorkel-")
            self.config.run_dir = self.scratch.name
        assert self.config.run_dir is not None
        run_dir = Path(self.config.run_dir)
        self.last_checkpoint = run_dir / CHECKPOINT_DIR / LAST
        self._open_log_dirs(resume)
        try:
            super().fit(model, loaders, resume_from=resume)
        finally:
            if own_dir:
                self.config.run_dir = None
            if loaded is not None:
                loaded.cleanup()
        best = run_dir / CHECKPOINT_DIR / BEST
        if self.snorkel_config.get("checkpointing") and best.exists():
            model.load(best)

    def _open_log_dirs(self, resume: str | os.PathLike[str] | None) -> None:
        """Open the writers of Snorkel's own log directory at the resumed step."""
        writers = [w for w in self.config.writers or [] if isinstance(w, LogDirWriter)]
        if not writers:
            return
        step = None
        if resume is not None:
            history = load_checkpoint(resume)["run"]["history"]
            step = int(history[-1]["step"]) if history else -1
        for w in writers:
            w.open(step)

    def save(self, trainer_path: str | os.PathLike[str]) -> None:
        """Write the last ``fit``'s state (model, optimizer, schedules, random states, the
        Snorkel config) to ``trainer_path``: :meth:`load` and ``fit`` continue it exactly.

        Raises:
            ConfigError: No ``fit`` has written a checkpoint yet.
        """
        if self.last_checkpoint is None or not self.last_checkpoint.exists():
            raise ConfigError(
                [
                    "Trainer.save: no run to save yet; call fit first (an interrupted fit "
                    "saves its last checkpoint: set checkpointing=True to have one)"
                ]
            )
        state = load_checkpoint(self.last_checkpoint)
        state["snorkel"] = {"name": self.name, "config": self.snorkel_config}
        save_checkpoint(state, trainer_path)

    def load(
        self, trainer_path: str | os.PathLike[str], model: _MultitaskClassifier | None
    ) -> None:
        """Snorkel's ``load``: the saved config replaces this trainer's; with ``model``, the
        next ``fit(model, ...)`` continues the saved run (weights, optimizer, schedules).

        Raises:
            CheckpointError: Not a trainer file, or one whose weights do not fit ``model``.
        """
        saved = load_checkpoint(trainer_path)
        snorkel = saved.get("snorkel")
        if isinstance(snorkel, Mapping):
            config = dict(snorkel["config"])
            _Trainer.__init__(self, **snorkel_to_mtlgraph(config))
            self.snorkel_config = config
        if model is None:
            return
        problems = state_problems(model, saved.get("model"), saved.get("task_names"))
        if problems:
            raise CheckpointError(
                f"Trainer.load: '{os.fspath(trainer_path)}' is from another model: "
                f"{'; '.join(problems)}; pass the model that run trained"
            )
        # Snorkel read the file here; a copy keeps the run when the file goes away before fit
        self.loaded = tempfile.TemporaryDirectory(prefix="mtlgraph-snorkel-")
        self.resume_from = save_checkpoint(saved, Path(self.loaded.name) / LAST)
