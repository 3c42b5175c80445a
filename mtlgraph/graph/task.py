"""Operations and Tasks: the declarative pieces of a multi-task graph.

A :class:`Task` names a *module pool* (module name -> ``nn.Module``) and an *operation sequence*:
which module runs on which inputs, in order; the last operation's output is the task's output.
Losses live in :mod:`mtlgraph.graph.losses`, the ignore mask in :mod:`mtlgraph.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import GraphError, TaskDefinitionError
from mtlgraph.graph.losses import (
    LossFunc,
    MaskedMultilabelLoss,
    MaskedRegressionLoss,
    binary_loss,
    multiclass_loss,
)
from mtlgraph.metrics import Scorer

__all__ = [
    "INPUT",
    "TASK_TYPES",
    "Input",
    "InputSpec",
    "Operation",
    "OutputFunc",
    "Task",
    "TaskType",
    "detach",
    "identity_output",
    "sigmoid_output",
    "softmax_output",
    "unknown_label_error",
    "unknown_tasks_error",
]

INPUT = "_input_"
"""Name of the whole input dictionary ``X_dict`` in an operation's inputs."""

TaskType = Literal["multiclass", "binary", "multilabel", "regression"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

OutputFunc = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Input:
    """One input of an :class:`Operation`.

    Attributes:
        source: An earlier operation's name, or ``"_input_"`` for the input dictionary.
        key: Optional key or index into the source's output (``"circle_data"``, ``0``).
        detach: Stop-gradient edge: the value is detached, so the consuming operation's loss
            sends no gradient back into ``source``.

    Example:
        >>> from mtlgraph import Input, Operation
        >>> Operation("b_head", [Input("a_head", detach=True), "trunk"]).inputs[0].detach
        True
    """

    source: str
    key: str | int | None = None
    detach: bool = False


def detach(source: str, key: str | int | None = None) -> Input:
    """Shorthand for a stop-gradient input: ``Input(source, key, detach=True)``."""
    return Input(source, key, detach=True)


InputSpec = str | tuple[str, str | int] | Input


def _parse_input(spec: object) -> Input | str:
    """Return a normalised :class:`Input`, or an error sentence."""
    if isinstance(spec, Input):
        if not isinstance(spec.source, str) or not spec.source:
            return f"Input source {spec.source!r} must be a non-empty string"
        return spec
    if isinstance(spec, str):
        return Input(spec) if spec else "an input name must not be empty"
    if (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], (str, int))
        and not isinstance(spec[1], bool)
    ):
        return Input(spec[0], spec[1])
    return (
        f"input {spec!r} must be an op name, '_input_', an (op_name, key_or_index) tuple "
        "or an Input"
    )


class Operation:
    """Run module ``module_name`` on ``inputs``; the result is stored under ``name``.

    Args:
        module_name: Name of a module in the task's module pool.
        inputs: Each an earlier operation's name, ``"_input_"`` (the whole ``X_dict``), a tuple
            ``(op_name, key_or_index)`` that indexes into an output, or an :class:`Input`
            (for stop-gradient edges). Several inputs are passed positionally to the module.
        name: Name of this operation's output; defaults to ``module_name``.

    Raises:
        TaskDefinitionError: Malformed names or inputs (all problems at once).

    Example:
        >>> from mtlgraph import Operation
        >>> op = Operation("base_mlp", [("_input_", "circle_data")])
        >>> op.name, op.inputs[0].source, op.inputs[0].key
        ('base_mlp', '_input_', 'circle_data')
    """

    __slots__ = ("inputs", "module_name", "name")

    def __init__(
        self, module_name: str, inputs: Sequence[InputSpec], name: str | None = None
    ) -> None:
        problems: list[str] = []
        if not isinstance(module_name, str) or not module_name:
            problems.append(f"module_name {module_name!r} must be a non-empty string")
        if name is not None and (not isinstance(name, str) or not name):
            problems.append(f"name {name!r} must be a non-empty string or None")
        op_name = name if name is not None else module_name
        if isinstance(op_name, str) and "/" in op_name:
            problems.append(f"operation name '{op_name}' must not contain '/'")
        if op_name == INPUT:
            problems.append(f"'{INPUT}' is reserved for the input dictionary; rename the op")
        if isinstance(inputs, (str, tuple, Input)) or not isinstance(inputs, Sequence):
            problems.append(
                f"inputs of operation '{op_name}' must be a list, got {type(inputs).__name__}"
                f" (write [{inputs!r}])"
            )
            inputs = []
        elif len(inputs) == 0:
            problems.append(f"operation '{op_name}' has no inputs")
        parsed: list[Input] = []
        for spec in inputs:
            result = _parse_input(spec)
            if isinstance(result, str):
                problems.append(f"operation '{op_name}': {result}")
            else:
                parsed.append(result)
        if problems:
            raise TaskDefinitionError(problems, header=f"invalid Operation '{op_name}':")
        self.module_name: str = module_name
        self.name: str = op_name
        self.inputs: tuple[Input, ...] = tuple(parsed)

    def _key(self) -> tuple[str, str, tuple[Input, ...]]:
        return self.module_name, self.name, self.inputs

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Operation) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        ins = ", ".join(_input_repr(i) for i in self.inputs)
        return f"Operation(name={self.name!r}, module_name={self.module_name!r}, inputs=[{ins}])"


def _input_repr(i: Input) -> str:
    if i.detach:
        return repr(i)
    return repr(i.source) if i.key is None else repr((i.source, i.key))


# ---------------------------------------------------------------- defaults per task type


def softmax_output(output: torch.Tensor) -> torch.Tensor:
    """Softmax over the class dimension (dim 1)."""
    return F.softmax(output, dim=1)


def sigmoid_output(output: torch.Tensor) -> torch.Tensor:
    """Sigmoid; a trailing dimension of size 1 is dropped so binary tasks give ``(N,)``."""
    p = torch.sigmoid(output)
    return p.squeeze(-1) if p.ndim == 2 and p.shape[1] == 1 else p


def identity_output(output: torch.Tensor) -> torch.Tensor:
    """The raw output (regression); a trailing dimension of size 1 is dropped."""
    return output.squeeze(-1) if output.ndim == 2 and output.shape[1] == 1 else output


_DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "multiclass": ("accuracy",),
    "binary": ("accuracy",),
    "multilabel": ("accuracy",),
    "regression": ("mse", "mae", "r2"),
}


class Task:
    """A named path through the network, with its loss, output function and metrics.

    Args:
        name: Task name; labels in a dataset's ``Y_dict`` refer to it. No ``/``.
        module_pool: Module name -> module (``nn.ModuleDict`` or a mapping). Modules with the
            same name in several tasks are one shared module in the model.
        op_sequence: The :class:`Operation` list; the last one's output is the task output.
        loss_func: ``loss_func(output, target) -> scalar``, called on active rows only.
            Defaults by ``task_type``: cross-entropy, BCE with logits, masked multilabel BCE, MSE.
        output_func: Maps the task output to probabilities / values at prediction time.
            Defaults: softmax (multiclass), sigmoid (binary, multilabel), identity (regression).
        scorer: A :class:`Scorer`; defaults to a fresh one with the task type's metrics
            (accuracy for classification, mse/mae/r2 for regression).
        task_type: ``"multiclass"`` (default), ``"binary"``, ``"multilabel"`` or ``"regression"``.
        weight: Static loss weight (>= 0) used by loss-weighting balancers (default 1.0).
        ignore_value: Label value masked out of loss and metrics: ``-1`` by default, NaN for
            regression; ``None`` masks nothing.
        threshold: Probability threshold for predictions of binary and multilabel tasks.

    Raises:
        TaskDefinitionError: Every problem found, each naming its culprit with a suggestion.

    Example:
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> task = Task(
        ...     name="circle_task",
        ...     module_pool=nn.ModuleDict(
        ...         {"base_mlp": nn.Linear(2, 4), "circle_head": nn.Linear(4, 2)}
        ...     ),
        ...     op_sequence=[
        ...         Operation("base_mlp", [("_input_", "circle_data")]),
        ...         Operation("circle_head", ["base_mlp"]),
        ...     ],
        ... )
        >>> task.output_op, task.scorer.metric_keys
        ('circle_head', ['accuracy'])
    """

    def __init__(
        self,
        name: str,
        module_pool: Mapping[str, nn.Module],
        op_sequence: Sequence[Operation],
        loss_func: LossFunc | None = None,
        output_func: OutputFunc | None = None,
        scorer: Scorer | None = None,
        task_type: TaskType = "multiclass",
        weight: float = 1.0,
        ignore_value: float | int | Literal["default"] | None = "default",
        threshold: float = 0.5,
    ) -> None:
        problems: list[str] = []
        if not isinstance(name, str) or not name or "/" in name:
            problems.append(f"task name {name!r} must be a non-empty string without '/'")
            name = str(name)
        who = f"task '{name}'"
        if task_type not in TASK_TYPES:
            problems.append(
                f"{who}: unknown task_type {task_type!r}{did_you_mean(str(task_type), TASK_TYPES)};"
                f" choose one of {quoted(TASK_TYPES)}"
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight >= 0)
        ):
            problems.append(f"{who}: weight must be a finite number >= 0, got {weight!r}")
        if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            problems.append(f"{who}: threshold must be in (0, 1), got {threshold!r}")
        for what, fn in (("loss_func", loss_func), ("output_func", output_func)):
            if fn is not None and not callable(fn):
                problems.append(f"{who}: {what} must be callable, got {type(fn).__name__}")
        if scorer is not None and not isinstance(scorer, Scorer):
            problems.append(f"{who}: scorer must be a Scorer, got {type(scorer).__name__}")

        pool = self._check_pool(module_pool, who, problems)
        names = list(module_pool) if isinstance(module_pool, Mapping | nn.ModuleDict) else []
        ops = self._check_ops(op_sequence, names, who, problems)
        if problems:
            header = f"invalid Task '{name}':" if len(problems) > 1 else None
            raise TaskDefinitionError(problems, header=header)

        self.name: str = name
        self.task_type: str = task_type
        self.module_pool: nn.ModuleDict = pool
        self.op_sequence: list[Operation] = ops
        self.weight: float = float(weight)
        self.threshold: float = float(threshold)
        if ignore_value == "default":
            ignore_value = math.nan if task_type == "regression" else -1
        self.ignore_value: float | int | None = ignore_value
        self.loss_func: LossFunc = loss_func or self._default_loss()
        self.output_func: OutputFunc = output_func or self._default_output()
        self.scorer: Scorer = scorer if scorer is not None else Scorer(_DEFAULT_METRICS[task_type])

    @staticmethod
    def _check_pool(
        module_pool: Mapping[str, nn.Module], who: str, problems: list[str]
    ) -> nn.ModuleDict:
        if not isinstance(module_pool, Mapping | nn.ModuleDict):
            problems.append(f"{who}: module_pool must be an nn.ModuleDict or a mapping")
            return nn.ModuleDict()
        before = len(problems)
        for key, module in module_pool.items():
            if not isinstance(key, str) or not key or "/" in key or "." in key:
                problems.append(f"{who}: module name {key!r} must be non-empty, without '/' or '.'")
            elif hasattr(nn.ModuleDict, key):  # torch would refuse it with a bare KeyError
                problems.append(
                    f"{who}: module name '{key}' is an attribute of torch.nn.Module; rename the "
                    f"module (e.g. '{key}_module')"
                )
            elif not isinstance(module, nn.Module):
                problems.append(
                    f"{who}: module '{key}' is a {type(module).__name__}, not an nn.Module"
                    " (wrap functions in an nn.Module)"
                )
        if len(problems) > before:
            return nn.ModuleDict()
        return module_pool if isinstance(module_pool, nn.ModuleDict) else nn.ModuleDict(module_pool)

    @staticmethod
    def _check_ops(
        op_sequence: Sequence[Operation], pool: list[str], who: str, problems: list[str]
    ) -> list[Operation]:
        if isinstance(op_sequence, Operation) or not isinstance(op_sequence, Sequence):
            problems.append(f"{who}: op_sequence must be a list of Operations")
            return []
        if len(op_sequence) == 0:
            problems.append(f"{who}: op_sequence is empty; add at least one Operation")
            return []
        problems += [
            f"{who}: op_sequence[{i}] is a {type(op).__name__}, not an Operation"
            for i, op in enumerate(op_sequence)
            if not isinstance(op, Operation)
        ]
        steps = [
            (op.name, op.module_name, [inp.source for inp in op.inputs])
            for op in op_sequence
            if isinstance(op, Operation)
        ]
        problems += [
            f"{who}: {message}"
            for _, _, message in op_problems(steps, pool, f"the pool has {quoted(pool)}")
        ]
        return list(op_sequence)

    def _default_loss(self) -> LossFunc:
        if self.task_type == "multilabel":
            return MaskedMultilabelLoss(self.ignore_value)
        if self.task_type == "regression":
            return MaskedRegressionLoss(self.ignore_value)
        return binary_loss if self.task_type == "binary" else multiclass_loss

    def _default_output(self) -> OutputFunc:
        if self.task_type == "regression":
            return identity_output
        return softmax_output if self.task_type == "multiclass" else sigmoid_output

    @property
    def output_op(self) -> str:
        """Name of the operation whose output is the task output (the last one)."""
        return self.op_sequence[-1].name

    def predictions(self, probs: torch.Tensor) -> torch.Tensor:
        """Turn output-function values into predictions for this task's type.

        Multiclass: argmax over dim 1. Binary/multilabel: ``probs >= threshold``. Regression: the
        values themselves.
        """
        if self.task_type == "regression":
            return probs
        if self.task_type in ("binary", "multilabel"):
            if probs.ndim == 2 and probs.shape[1] == 2 and self.task_type == "binary":
                probs = probs[:, 1]
            return (probs >= self.threshold).long()
        return probs.argmax(dim=1) if probs.ndim > 1 else probs.round().long()

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, task_type={self.task_type!r}, "
            f"modules={list(self.module_pool)}, ops={[op.name for op in self.op_sequence]})"
        )


def op_problems(
    steps: Sequence[tuple[str, str, Sequence[object]]], pool: Sequence[str], pool_note: str
) -> list[tuple[int, str, str]]:
    """What is wrong with an operation sequence given as ``(name, module, input sources)``
    steps: ``(step index, part, message)``, ``part`` being ``""``, ``".module"`` or
    ``".inputs[j]"`` (for key paths). ``pool_note`` ends an unknown module's message."""
    problems: list[tuple[int, str, str]] = []
    names = [name for name, _, _ in steps]
    seen: list[str] = []
    for i, (name, module, sources) in enumerate(steps):
        if name in seen:
            problems.append((i, "", f"duplicate operation name '{name}'; give one its own name"))
        if module not in pool:
            problems.append(
                (
                    i,
                    ".module",
                    f"unknown module '{module}' in operation '{name}'"
                    f"{did_you_mean(module, pool)}; {pool_note}",
                )
            )
        for j, source in enumerate(sources):
            if not isinstance(source, str) or source == INPUT or source in seen:
                continue
            if source == name:
                why = "its own output; an operation can only read earlier operations"
            elif source in names:
                why = f"'{source}', which runs later; reorder the operations"
            else:
                why = (
                    f"'{source}', which names no earlier operation"
                    f"{did_you_mean(source, [*seen, INPUT])}; inputs are earlier operations or "
                    f"'{INPUT}'"
                )
            problems.append((i, f".inputs[{j}]", f"operation '{name}' reads {why}"))
        seen.append(name)
    return problems


def unknown_tasks_error(unknown: Iterable[str], tasks: Mapping[str, Task]) -> GraphError:
    """The error for task names a model does not hold, each with a suggestion."""
    return GraphError(
        [
            f"unknown task '{t}'{did_you_mean(t, tasks)}; the model has {quoted(tasks)}"
            for t in unknown
        ]
    )


def unknown_label_error(label: str, tasks: Mapping[str, Task], remap: bool = True) -> GraphError:
    """The error for a batch label that names no task of the model; ``remap``: the caller
    takes ``remap_labels`` (``predict``, ``score``), so the fix names it."""
    fix = (
        f"Pass remap_labels={{'{label}': <task or None>}} to score it with another task's "
        "head or to drop it"
        if remap
        else f"Remove '{label}' from the batch's Y_dict or rename it to a task"
    )
    return GraphError(
        f"label '{label}' names no task of the model{did_you_mean(label, tasks)}; "
        f"the model has {quoted(tasks)}. {fix}"
    )
