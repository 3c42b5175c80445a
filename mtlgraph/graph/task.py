"""Operations and Tasks: the declarative pieces of a multi-task graph.

A :class:`Task` names a *module pool* (module name -> ``nn.Module``) and an *operation sequence*:
which module runs on which inputs, in order. The output of the last operation is the task's
output: it feeds the task's loss during training and its output function at prediction time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import TaskDefinitionError
from mtlgraph.metrics import Scorer

INPUT = "_input_"
"""Name of the whole input dictionary ``X_dict`` in an operation's inputs."""

TaskType = Literal["multiclass", "binary", "multilabel", "regression"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

LossFunc = Callable[[Any, torch.Tensor], torch.Tensor]
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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Operation):
            return NotImplemented
        return (self.module_name, self.name, self.inputs) == (
            other.module_name,
            other.name,
            other.inputs,
        )

    def __hash__(self) -> int:
        return hash((self.module_name, self.name, self.inputs))

    def __repr__(self) -> str:
        ins = ", ".join(_input_repr(i) for i in self.inputs)
        return f"Operation(name={self.name!r}, module_name={self.module_name!r}, inputs=[{ins}])"


def _input_repr(i: Input) -> str:
    if i.detach:
        return repr(i)
    return repr(i.source) if i.key is None else repr((i.source, i.key))


# ---------------------------------------------------------------- defaults per task type


def _rows_match(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reshape ``(N, 1)`` outputs to ``(N,)`` targets (and similar) when element counts agree."""
    if output.shape != target.shape and output.numel() == target.numel():
        return output.reshape(target.shape)
    return output


def multiclass_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits ``(N, C)`` and class ids ``(N,)`` (mean over rows)."""
    return F.cross_entropy(output, target.long())


def binary_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits on one logit per row and 0/1 targets."""
    output = _rows_match(output, target)
    if output.shape != target.shape:
        raise ValueError(
            f"a binary task needs one logit per label: output of shape {tuple(output.shape)} "
            f"for labels of shape {tuple(target.shape)}; give the head one output unit, or use "
            "task_type='multiclass' for one logit per class"
        )
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))


def regression_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.mse_loss(_rows_match(output, target), target.to(output.dtype))


@dataclass(frozen=True)
class MaskedMultilabelLoss:
    """BCE with logits over ``(N, L)`` targets, ignoring elements equal to ``ignore_value``."""

    ignore_value: float | int | None = -1

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        active = _active(target, self.ignore_value)
        t = torch.where(active, target, torch.zeros_like(target)).to(output.dtype)
        loss = F.binary_cross_entropy_with_logits(output, t, reduction="none")
        return (loss * active).sum() / active.sum().clamp_min(1)


@dataclass(frozen=True)
class MaskedRegressionLoss:
    """MSE over multi-output targets ``(N, D)``, ignoring elements equal to ``ignore_value``."""

    ignore_value: float | int | None = math.nan

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = _rows_match(output, target)
        active = _active(target, self.ignore_value)
        if bool(active.all()):
            return F.mse_loss(output, target.to(output.dtype))
        t = torch.where(active, target, torch.zeros_like(target)).to(output.dtype)
        return (((output - t) ** 2) * active).sum() / active.sum().clamp_min(1)


def l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error; ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.l1_loss(_rows_match(output, target), target.to(output.dtype))


def smooth_l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber-like smooth L1 loss (beta 1); ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.smooth_l1_loss(_rows_match(output, target), target.to(output.dtype))


_LOSSES: dict[str, LossFunc] = {
    "cross_entropy": multiclass_loss,
    "binary_cross_entropy": binary_loss,
    "mse": regression_loss,
    "l1": l1_loss,
    "smooth_l1": smooth_l1_loss,
}


def register_loss(name: str, func: LossFunc) -> None:
    """Register a loss function under ``name`` so configs can select it (``loss: <name>``).

    Args:
        name: Registry name.
        func: ``func(output, target) -> scalar tensor``, called on a task's active rows.

    Raises:
        TaskDefinitionError: The name is taken or ``func`` is not callable.

    Example:
        >>> import torch.nn.functional as F
        >>> from mtlgraph import register_loss
        >>> register_loss("nll_doc", lambda out, y: F.nll_loss(out, y.long()))
    """
    if not isinstance(name, str) or not name or not callable(func):
        raise TaskDefinitionError([f"loss {name!r} needs a non-empty name and a callable"])
    if name in _LOSSES:
        raise TaskDefinitionError([f"loss '{name}' is already registered; pick another name"])
    _LOSSES[name] = func


def loss_names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFunc | None:
    """The loss registered as ``name``, or ``None``."""
    return _LOSSES.get(name)


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


def _active(labels: torch.Tensor, ignore: float | int | None) -> torch.Tensor:
    """Boolean mask of labels that are not the ignore value (elementwise)."""
    if ignore is None:
        return torch.ones_like(labels, dtype=torch.bool)
    if isinstance(ignore, float) and math.isnan(ignore):
        return (
            ~torch.isnan(labels)
            if labels.is_floating_point()
            else torch.ones_like(labels, dtype=torch.bool)
        )
    return labels != ignore


def active_rows(labels: torch.Tensor, ignore: float | int | None) -> torch.Tensor:
    """Rows with at least one label that is not the ignore value."""
    active = _active(labels, ignore)
    return active if active.ndim == 1 else active.reshape(len(active), -1).any(dim=1)


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
        bad = False
        for key, module in module_pool.items():
            if not isinstance(key, str) or not key or "/" in key or "." in key:
                problems.append(f"{who}: module name {key!r} must be non-empty, without '/' or '.'")
                bad = True
            elif not isinstance(module, nn.Module):
                problems.append(
                    f"{who}: module '{key}' is a {type(module).__name__}, not an nn.Module"
                    " (wrap functions in an nn.Module)"
                )
                bad = True
        if bad:
            return nn.ModuleDict()
        return (
            module_pool
            if isinstance(module_pool, nn.ModuleDict)
            else nn.ModuleDict(dict(module_pool))
        )

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
        all_names = [op.name for op in op_sequence if isinstance(op, Operation)]
        seen: list[str] = []
        for i, op in enumerate(op_sequence):
            if not isinstance(op, Operation):
                problems.append(
                    f"{who}: op_sequence[{i}] is a {type(op).__name__}, not an Operation"
                )
                continue
            if op.name in seen:
                problems.append(
                    f"{who}: duplicate operation name '{op.name}'; pass name=... to tell them apart"
                )
            if op.module_name not in pool:
                problems.append(
                    f"{who}: unknown module '{op.module_name}' in operation '{op.name}'"
                    f"{did_you_mean(op.module_name, pool)}; the pool has {quoted(pool)}"
                )
            for inp in op.inputs:
                if inp.source == INPUT or inp.source in seen:
                    continue
                if inp.source == op.name:
                    problems.append(
                        f"{who}: operation '{op.name}' uses its own output as an input; an "
                        "operation can only read earlier operations"
                    )
                elif inp.source in all_names:
                    problems.append(
                        f"{who}: operation '{op.name}' uses '{inp.source}', which runs later;"
                        " reorder the op_sequence"
                    )
                else:
                    problems.append(
                        f"{who}: operation '{op.name}' has input '{inp.source}', which names no "
                        f"earlier operation{did_you_mean(inp.source, [*seen, INPUT])}"
                    )
            seen.append(op.name)
        return list(op_sequence)

    def _default_loss(self) -> LossFunc:
        if self.task_type == "binary":
            return binary_loss
        if self.task_type == "multilabel":
            return MaskedMultilabelLoss(self.ignore_value)
        if self.task_type == "regression":
            return MaskedRegressionLoss(self.ignore_value)
        return multiclass_loss

    def _default_output(self) -> OutputFunc:
        if self.task_type in ("binary", "multilabel"):
            return sigmoid_output
        if self.task_type == "regression":
            return identity_output
        return softmax_output

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
