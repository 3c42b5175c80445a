"""MultitaskClassifier: tasks merged by module name into one shared graph.

Two tasks that name the same module share its weights; different names mean separate weights.
Operations are merged too: two operations that run the same module on the same inputs are one
node of the graph, computed once per batch however many tasks need it. A batch runs only the
nodes its tasks need, through an execution plan cached per set of tasks, so a step's cost does
not grow with the number of tasks the model holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph._io import atomic_torch_save, map_structure, tensor_leaves
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader
from mtlgraph.exceptions import DataError, GraphError
from mtlgraph.graph.model_file import (
    load_model_state,
    model_entries,
    read_checkpoint,
    state_problems,
)
from mtlgraph.graph.plan import INPUT_ID, ExecutionPlan, Source
from mtlgraph.graph.slices import SliceFunc
from mtlgraph.graph.task import INPUT, Task, unknown_label_error, unknown_tasks_error
from mtlgraph.metrics import active_rows

logger = logging.getLogger(__name__)


@dataclass
class _Node:
    """One merged operation: a module applied to inputs (interned by structure)."""

    id: int
    module_name: str
    srcs: tuple[Source, ...]
    tasks: set[str]


class MultitaskClassifier(nn.Module):
    """A multi-task model built from :class:`~mtlgraph.Task` objects.

    Args:
        tasks: The tasks. Modules are merged by name across tasks (same name = shared weights);
            one name bound to two different module objects is an error.
        name: A name for logs and checkpoints (default ``"MultitaskClassifier"``).
        device: ``"cpu"``, ``"cuda:1"``, ... or a ``torch.device``; batches are moved there too.

    Raises:
        GraphError: Duplicate task names or conflicting modules, all reported at once.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> trunk = nn.Linear(2, 4)
        >>> tasks = [
        ...     Task(f"{t}_task", {"trunk": trunk, f"{t}_head": nn.Linear(4, 2)},
        ...          [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])])
        ...     for t in ("a", "b")
        ... ]
        >>> model = MultitaskClassifier(tasks)
        >>> sorted(model.module_pool)
        ['a_head', 'b_head', 'trunk']
        >>> out = model.forward({"x": torch.randn(3, 2)}, ["a_task", "b_task"])
        >>> sorted(out), out["a_head"].shape
        (['a_head', 'b_head', 'trunk'], torch.Size([3, 2]))
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        name: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.name: str = name or type(self).__name__
        self.module_pool: nn.ModuleDict = nn.ModuleDict()
        self._tasks: dict[str, Task] = {}
        self._module_users: dict[str, set[str]] = {}
        self._nodes: dict[int, _Node] = {}
        self._node_ids: dict[tuple[str, tuple[Source, ...]], int] = {}
        self._task_ops: dict[str, dict[str, int]] = {}
        self._next_id = 0
        self._plans: dict[tuple[str, ...], ExecutionPlan] = {}
        self._device = torch.device(device)
        if isinstance(tasks, Task) or not isinstance(tasks, Sequence):
            raise GraphError(["tasks must be a list of Task objects"])
        problems = self._merge_problems(tasks)
        if problems:
            raise GraphError(
                problems, header="cannot build the model:" if len(problems) > 1 else None
            )
        for task in tasks:
            self._add(task)
        self.to(self._device)

    # ------------------------------------------------------------------ structure

    @property
    def tasks(self) -> Mapping[str, Task]:
        """Task name -> :class:`Task` (read-only view)."""
        return MappingProxyType(self._tasks)

    @property
    def task_names(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self._tasks)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (where batches are moved)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else self._device

    def add_task(self, task: Task) -> None:
        """Add a task, sharing modules by name with the tasks already in the model.

        Raises:
            GraphError: The name is taken, or one of its module names is bound to another object.
        """
        problems = self._merge_problems([task])
        if problems:
            raise GraphError(problems, header=f"cannot add task '{getattr(task, 'name', task)}':")
        self._add(task)
        self.module_pool.to(self.device)

    def remove_task(self, task_name: str) -> Task:
        """Remove a task; modules and operations no remaining task uses are pruned.

        Returns:
            The removed :class:`Task`.
        """
        if task_name not in self._tasks:
            hint = f"{did_you_mean(task_name, self._tasks)}; the model has {quoted(self._tasks)}"
            raise GraphError([f"no task '{task_name}' to remove{hint}"])
        task = self._tasks.pop(task_name)
        for node_id in set(self._task_ops.pop(task_name).values()):
            node = self._nodes[node_id]
            node.tasks.discard(task_name)
            if not node.tasks:
                del self._nodes[node_id]
                del self._node_ids[(node.module_name, node.srcs)]
        for module_name in task.module_pool:
            users = self._module_users.get(module_name)
            if users is None:
                continue
            users.discard(task_name)
            if not users:
                del self._module_users[module_name]
                del self.module_pool[module_name]
        self._plans.clear()
        return task

    def _merge_problems(self, tasks: Iterable[Task]) -> list[str]:
        """Every reason the tasks cannot join this model (checked before anything changes)."""
        problems: list[str] = []
        names = set(self._tasks)
        owners: dict[str, tuple[nn.Module, str]] = {
            m: (self.module_pool[m], sorted(users)[0]) for m, users in self._module_users.items()
        }
        for task in tasks:
            if not isinstance(task, Task):
                problems.append(f"{task!r} is a {type(task).__name__}, not a Task")
                continue
            if task.name in names:
                problems.append(f"task name '{task.name}' is used twice; task names must be unique")
                continue  # its modules would only repeat the clash
            names.add(task.name)
            for module_name, module in task.module_pool.items():
                if module_name not in owners:
                    owners[module_name] = (module, task.name)
                elif owners[module_name][0] is not module:
                    other = owners[module_name][1]
                    problems.append(
                        f"module name '{module_name}' is bound to different module objects in "
                        f"tasks '{other}' and '{task.name}'; pass the same object to share "
                        "weights, or use different names to keep them separate"
                    )
        return problems

    def _add(self, task: Task) -> None:
        op_ids: dict[str, int] = {}
        for op in task.op_sequence:
            srcs = tuple(
                (INPUT_ID if i.source == INPUT else op_ids[i.source], i.key, i.detach)
                for i in op.inputs
            )
            key = (op.module_name, srcs)
            node_id = self._node_ids.get(key)
            if node_id is None:
                node_id = self._next_id
                self._next_id += 1
                self._node_ids[key] = node_id
                self._nodes[node_id] = _Node(node_id, op.module_name, srcs, set())
            self._nodes[node_id].tasks.add(task.name)
            op_ids[op.name] = node_id
        for module_name, module in task.module_pool.items():
            if module_name not in self.module_pool:
                self.module_pool[module_name] = module
            self._module_users.setdefault(module_name, set()).add(task.name)
        self._tasks[task.name] = task
        self._task_ops[task.name] = op_ids
        self._plans.clear()

    # ------------------------------------------------------------------ execution

    def plan(self, task_names: Iterable[str]) -> ExecutionPlan:
        """The cached :class:`ExecutionPlan` for a set of tasks (built on first use)."""
        key = tuple(task_names)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build_plan(key)
            self._plans[key] = plan
        return plan

    def _build_plan(self, task_names: tuple[str, ...]) -> ExecutionPlan:
        unknown = [t for t in task_names if t not in self._tasks]
        if unknown:
            raise unknown_tasks_error(unknown, self._tasks)
        node_ids = sorted({n for t in task_names for n in self._task_ops[t].values()})
        steps = tuple(
            (n, self.module_pool[self._nodes[n].module_name], self._nodes[n].srcs) for n in node_ids
        )
        outputs = {t: self._task_ops[t][self._tasks[t].output_op] for t in task_names}
        by_name: dict[str, set[int]] = {}
        for t in task_names:
            for op_name, n in self._task_ops[t].items():
                by_name.setdefault(op_name, set()).add(n)
        named: list[tuple[str, int]] = []
        for t in task_names:
            for op_name, n in self._task_ops[t].items():
                # an output name (see forward), not a score key: score keys use make_key
                key = op_name if len(by_name[op_name]) == 1 else f"{t}/{op_name}"
                if (key, n) not in named:
                    named.append((key, n))
        task_modules = {
            t: tuple(dict.fromkeys(op.module_name for op in self._tasks[t].op_sequence))
            for t in task_names
        }
        module_names = tuple(dict.fromkeys(m for t in task_names for m in task_modules[t]))
        params: dict[int, nn.Parameter] = {}
        for m in module_names:
            for p in self.module_pool[m].parameters():
                params.setdefault(id(p), p)
        return ExecutionPlan(
            task_names=task_names,
            steps=steps,
            outputs=MappingProxyType(outputs),
            named_outputs=tuple(named),
            module_names=module_names,
            task_modules=MappingProxyType(task_modules),
            parameters=tuple(params.values()),
        )

    def execute(self, plan: ExecutionPlan, X_dict: Mapping[str, Any]) -> dict[int, Any]:
        """Run a plan on one batch; returns node id -> output.

        An exception raised inside a module keeps its type and traceback; a note names the
        operation and the tasks that use it.
        """
        cache: dict[int, Any] = {}
        for node_id, module, srcs in plan.steps:
            args = []
            value: Any
            for src, key, det in srcs:
                value = X_dict if src == INPUT_ID else cache[src]
                if key is not None:
                    try:
                        value = value[key]
                    except (KeyError, IndexError, TypeError) as e:
                        raise self._input_error(node_id, src, key, value) from e
                if det:
                    value = _detach(value)
                args.append(value)
            try:
                cache[node_id] = module(*args)
            except Exception as e:
                e.add_note(f"mtlgraph: raised by {self._describe(node_id)}")
                raise
        return cache

    def _describe(self, node_id: int) -> str:
        node = self._nodes[node_id]
        names = sorted(
            {op for t in node.tasks for op, n in self._task_ops[t].items() if n == node_id}
        )
        return (
            f"operation {quoted(names)} (module '{node.module_name}') of "
            f"task{'s' if len(node.tasks) > 1 else ''} {quoted(node.tasks)}"
        )

    def _input_error(self, node_id: int, src: int, key: str | int, value: Any) -> DataError:
        where = "the batch's X_dict" if src == INPUT_ID else "the output of an earlier operation"
        have = f"; it has fields {quoted(map(str, value))}" if isinstance(value, Mapping) else ""
        hint = did_you_mean(str(key), map(str, value)) if isinstance(value, Mapping) else ""
        what = f"reads [{key!r}] from {where}, which has no such entry{hint}{have}"
        return DataError([f"{self._describe(node_id)} {what}"])

    def forward(self, X_dict: Mapping[str, Any], task_names: Iterable[str]) -> dict[str, Any]:
        """Run the operations the given tasks need, each once, on one batch.

        Args:
            X_dict: The batch's input fields (already on the model's device).
            task_names: Tasks whose operations to run.

        Returns:
            Operation name -> output for every operation of the requested tasks. When one name
            denotes different operations in two requested tasks (as ``base_mlp`` reading
            different fields), both are reported as ``"<task>/<op>"``.
        """
        plan = self.plan(task_names)
        cache = self.execute(plan, X_dict)
        return {key: cache[n] for key, n in plan.named_outputs}

    def calculate_loss(
        self,
        X_dict: Mapping[str, Any],
        Y_dict: Mapping[str, torch.Tensor],
        keep_empty: bool = False,
        all_active: Container[str] = (),
        outputs: list[tuple[ExecutionPlan, dict[int, Any]]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Per-task losses of one batch, masking labels equal to each task's ignore value.

        Args:
            X_dict: Input fields (on the model's device).
            Y_dict: Task name -> labels (on the model's device).
            keep_empty: Report tasks with no active label too, with a graph-connected zero loss
                and a count of 0 (under DDP every rank must run the same operations).
            all_active: Tasks whose labels are known to hold no ignore value (no mask computed).
            outputs: When given, the forward pass's plan and its outputs (node id -> output)
                are appended to it (representation-level gradients read them).

        Returns:
            ``(loss_dict, count_dict)``: task -> mean loss over its active rows, task -> their
            number; tasks with no active row are left out unless ``keep_empty``.
        """
        active = self._active_labels(Y_dict, keep_empty, all_active)
        if not active:
            return {}, {}
        key = tuple([t for t, _, _ in active])
        plan = self._plans.get(key)  # the cached plan, without a call to plan()
        if plan is None:
            plan = self.plan(key)
        cache = self.execute(plan, X_dict)
        if outputs is not None:
            outputs.append((plan, cache))
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for task_name, rows, labels in active:
            task = self._tasks[task_name]
            out = cache[plan.outputs[task_name]]
            if rows is not None and not bool(rows.any()):  # keep_empty: a connected zero
                losses[task_name], counts[task_name] = _zero_like_graph(out), 0
                continue
            if rows is not None:
                out, labels = _index_rows(out, rows), labels[rows]
            try:
                losses[task_name] = task.loss_func(out, labels)
            except Exception as e:
                e.add_note(f"mtlgraph: raised by the loss_func of task '{task_name}'")
                raise
            counts[task_name] = len(labels)
        return losses, counts

    def _active_labels(
        self, Y_dict: Mapping[str, torch.Tensor], keep_empty: bool, all_active: Container[str]
    ) -> list[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """``(task, rows to keep or None for all, labels)`` of the tasks a batch trains."""
        active: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
        tasks = self._tasks
        for label, y in Y_dict.items():
            task = tasks.get(label)
            if task is None:
                raise unknown_label_error(label, tasks, remap=False)
            if label in all_active:
                active.append((label, None, y))
                continue
            mask = active_rows(y, task.ignore_value)
            if bool(mask.all()):
                active.append((label, None, y))
            elif bool(mask.any()) or keep_empty:
                active.append((label, mask, y))
        return active

    # ------------------------------------------------------------------ evaluation

    def predict(
        self,
        dataloader: DictDataLoader | Iterable[tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]],
        return_preds: bool = False,
        remap_labels: Mapping[str, str | None] | None = None,
        task_names: Sequence[str] | None = None,
        slices: Mapping[str, SliceFunc] | Sequence[str] | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Predict every labelled task of a loader's batches (or the tasks you name).

        Args:
            dataloader: Batches ``(X_dict, Y_dict)``; each label selects the task that predicts.
            return_preds: Also return predictions (argmax / threshold / values).
            remap_labels: ``{label: task}`` scores a label with another task's head;
                ``{label: None}`` drops it.
            task_names: Predict these tasks on every batch, labelled or not (docs/inference.md).
            slices: Slice functions or registered names: adds ``"slice:<name>"`` masks.

        Returns:
            ``{"golds": {task: array}, "probs": {task: array}}`` plus ``"preds"`` when asked,
            keyed by the task that made the predictions; ``golds`` keep ignored labels.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mtlgraph import (DictDataLoader, DictDataset, MultitaskClassifier,
            ...                       Operation, Task)
            >>> model = MultitaskClassifier(
            ...     [Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])]
            ... )
            >>> new = DictDataset("new", "serve", {"x": torch.randn(5, 2)}, {})
            >>> unlabelled = DictDataLoader(new)
            >>> model.predict(unlabelled, task_names=["t"])["probs"]["t"].shape
            (5, 3)
        """
        from mtlgraph.inference.evaluation import predict

        return predict(self, dataloader, return_preds, remap_labels, task_names, slices)

    def score(
        self,
        dataloaders: DictDataLoader | Sequence[DictDataLoader],
        remap_labels: Mapping[str, str | None] | None = None,
        slices: Mapping[str, SliceFunc] | Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Score every task on every loader: ``{"task/dataset/split/metric": float}``.

        Args:
            dataloaders: One loader or a list.
            remap_labels: As in :meth:`predict`.
            slices: Also score each slice, as ``task/<dataset>:<slice>/split/metric``.

        Raises:
            DataError: Soft labels that are no distributions; a bad slice mask.
        """
        from mtlgraph.inference.evaluation import score

        return score(self, dataloaders, remap_labels, slices)

    def score_predictions(
        self,
        result: Mapping[str, Mapping[str, np.ndarray]],
        dataset_name: str,
        split: str,
        into: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Score a :meth:`predict` result (with ``preds``) with each task's scorer.

        Returns ``into`` (or a new dict) with the ``task/dataset/split/metric`` keys added; a key
        that is already present is an error (two loaders with the same dataset and split).
        """
        from mtlgraph.inference.evaluation import score_predictions

        return score_predictions(self.tasks, result, dataset_name, split, into)

    def export(
        self,
        path: str | os.PathLike[str],
        tasks: Sequence[str] | None = None,
        format: str = "torch_export",
        example: Mapping[str, Any] | None = None,
        **sidecar: Any,
    ) -> Any:
        """Export the tasks (default: all) to ``torch.export`` (``.pt2``) or ONNX, with a
        sidecar JSON (``<path>.json``); only the modules those tasks use are in the file.

        Args:
            path: The file to write (atomically; its directory must exist).
            tasks: The tasks whose outputs (after ``output_func``) the program returns.
            format: ``"torch_export"`` or ``"onnx"`` (needs ``mtlgraph[onnx]``).
            example: One batch's ``X_dict`` to trace (the batch dimension stays dynamic).
            **sidecar: ``class_labels={task: [...]}``, ``vocabularies={field: file}``.

        Returns:
            The written path (docs/inference.md).

        Raises:
            GraphError: Unknown tasks, a missing example field, or a module the exporter refuses.
        """
        from mtlgraph.inference.export import export

        return export(self, path, tasks, format, example, **sidecar)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the model as a checkpoint holding only the model (atomically)."""
        atomic_torch_save(model_entries(self), path)

    def load(self, path: str | os.PathLike[str], strict: bool = True) -> None:
        """Load the weights of a model file or training checkpoint, all or nothing.

        Args:
            path: The file.
            strict: Require exactly the same tasks and parameter names.

        Raises:
            FileNotFoundError: No such file.
            CheckpointError: Not a (valid) mtlgraph model file, or weights that do not match.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {os.fspath(path)!r} does not exist")
        checkpoint, name = read_checkpoint(path, self.device), f"{os.fspath(path)!r}"
        state, names = checkpoint.get("model"), checkpoint.get("task_names")
        if strict and not state_problems(self, state, names, strict=False):
            hint = "pass strict=False to load the part that matches"
        else:  # strict=False loads only files whose tasks and weights are all in the model
            hint = "load a file of this model, or build the model with the file's tasks"
        load_model_state(self, checkpoint, name, strict, hint)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tasks={self.task_names}"

    def __getstate__(self) -> dict[str, Any]:
        """State for ``copy.deepcopy`` and pickling, without the execution-plan cache (plans
        hold read-only mapping views, which cannot be copied; they are rebuilt on first use)."""
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state


def _detach(value: Any) -> Any:
    """Every tensor inside ``value`` detached (a stop-gradient edge)."""
    return map_structure(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def _zero_like_graph(out: Any) -> torch.Tensor:
    """``0 · Σ out``: a zero loss whose backward reaches every parameter ``out`` depends on."""
    first, *rest = tensor_leaves(out)
    return sum((t.float().sum() * 0.0 for t in rest), first.float().sum() * 0.0)


def _index_rows(out: Any, rows: torch.Tensor) -> Any:
    """The ``rows`` of every tensor inside ``out``."""
    return map_structure(lambda v: v[rows] if isinstance(v, torch.Tensor) else v, out)
