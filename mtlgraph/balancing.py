"""How a step's per-task losses become one update of the parameters.

A :class:`Balancer` receives the step's per-task losses and is responsible for putting gradients
into ``.grad`` (it calls ``ctx.backward``). Loss-based balancers combine the losses into one
scalar; gradient-based balancers may compute per-task gradients on the shared parameters and
combine them. Balancers are ``nn.Module`` objects: learned weights are parameters (optimised and
checkpointed with the model's), other state lives in buffers or ``state_dict`` extras.

The formulas are in ``docs/balancing.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError
from mtlgraph.model import ExecutionPlan
from mtlgraph.task import Task


@dataclass
class StepContext:
    """What a balancer knows about the current step.

    Attributes:
        tasks: Task name -> Task for the tasks in the step (``Task.weight`` is the static weight).
        plan: The execution plan of the step's tasks (modules per task, parameters).
        counts: Task name -> number of active labels in the step.
        backward: Call with a scalar loss to accumulate its gradients (handles loss scaling for
            mixed precision and gradient accumulation).
        scale: Apply the same scaling to a loss without calling backward (for
            ``torch.autograd.grad`` based methods).
        step: Global optimizer step number.
    """

    tasks: Mapping[str, Task]
    plan: ExecutionPlan
    counts: Mapping[str, int]
    backward: Callable[[torch.Tensor], None]
    scale: Callable[[torch.Tensor], torch.Tensor]
    step: int


class Balancer(nn.Module):
    """Base class: implement :meth:`backward`.

    Subclasses set ``name`` (the registry name). Optional hooks: :meth:`on_epoch_end` and
    :meth:`on_evaluation` (dynamic weighting), :meth:`weights` (for logging).
    """

    name: ClassVar[str] = ""

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        """Put the gradients of this step's combined objective into ``.grad``."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current per-task weights, for logging under ``model/all/train/weight/<task>``."""
        return {}

    def on_epoch_end(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        """Called after each epoch with the epoch's mean loss per task."""

    def on_evaluation(self, scores: Mapping[str, float]) -> None:
        """Called after each evaluation with the flat score dictionary."""


class SumBalancer(Balancer):
    """``L = Σ_i w_i · L_i`` with ``w_i = Task.weight`` (1 by default).

    Example:
        >>> from mtlgraph.balancing import make_balancer
        >>> make_balancer("sum").name
        'sum'
    """

    name = "sum"

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        total: torch.Tensor | None = None
        for task_name, loss in losses.items():
            w = ctx.tasks[task_name].weight
            if w != 1.0:
                loss = loss * w
            total = loss if total is None else total + loss
            self._last[task_name] = w
        if total is not None:
            ctx.backward(total)

    def weights(self) -> dict[str, float]:
        return dict(self._last)

    def get_extra_state(self) -> dict[str, float]:
        """The logged weights are state too: a resumed run logs what an uninterrupted one does."""
        return dict(self._last)

    def set_extra_state(self, state: Any) -> None:
        self._last = {str(k): float(v) for k, v in dict(state).items()}


_REGISTRY: dict[str, type[Balancer]] = {"sum": SumBalancer}


def register_balancer(name: str, cls: type[Balancer]) -> None:
    """Register a balancer class under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise ConfigError([f"balancer '{name}' must be a Balancer subclass"])
    if name in _REGISTRY:
        raise ConfigError([f"balancer '{name}' is already registered"])
    _REGISTRY[name] = cls


def balancer_names() -> list[str]:
    """Registered balancer names."""
    return sorted(_REGISTRY)


def make_balancer(spec: str | Mapping[str, Any] | Balancer) -> Balancer:
    """Build a balancer from a name, ``{"name": ..., **kwargs}``, or return an instance."""
    if isinstance(spec, Balancer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    else:
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(
            [
                f"unknown balancer {name!r}{did_you_mean(str(name), _REGISTRY)}; "
                f"known: {quoted(_REGISTRY)}"
            ]
        )
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ConfigError([f"balancer '{name}': {e}"]) from e
