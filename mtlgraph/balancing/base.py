"""The balancer interface: :class:`StepContext`, :class:`Balancer` and helpers every method uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.model import ExecutionPlan
from mtlgraph.graph.task import Task

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a balancer knows about the current step.

    Attributes:
        tasks: Task name -> Task for the model's tasks (``Task.weight`` is the static weight).
        plan: The execution plan of the step's tasks (modules per task, parameters).
        counts: Task name -> number of active labels in the step.
        backward: Call with a scalar loss to accumulate its gradients (handles loss scaling for
            mixed precision and gradient accumulation).
        scale: Apply the same scaling to a loss without calling backward (for
            ``torch.autograd.grad`` based methods).
        step: Global optimizer step number.
        reduce: Average a tensor over DDP ranks in place and return it (the identity in a single
            process). Gradient-based methods call it on the per-task gradients they compute with
            ``torch.autograd.grad``, which DDP does not reduce, so every rank combines the same,
            rank-averaged gradients.
        outputs: ``(plan, node id -> output)`` of each forward pass of the step, for balancers
            whose ``needs_outputs`` is true (representation-level gradients); empty otherwise.
        world_size: Number of DDP ranks (1 in a single process).
    """

    tasks: Mapping[str, Task]
    plan: ExecutionPlan
    counts: Mapping[str, int]
    backward: Callable[[torch.Tensor], None]
    scale: Callable[[torch.Tensor], torch.Tensor]
    step: int
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    outputs: Sequence[tuple[ExecutionPlan, Mapping[int, Any]]] = ()
    world_size: int = 1

    def weighted(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss times its task's static ``Task.weight``."""
        out = {}
        for task_name, loss in losses.items():
            w = self.tasks[task_name].weight
            out[task_name] = loss if w == 1.0 else loss * w
        return out

    def weighted_backward(
        self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]
    ) -> None:
        """``backward(Σ_i weights[i] · Task.weight_i · L_i)`` (a missing weight counts as 1).

        Example:
            >>> import torch
            >>> from types import SimpleNamespace
            >>> from mtlgraph.balancing import StepContext
            >>> tasks = {"t": SimpleNamespace(weight=2.0)}  # a Task: only its weight is read
            >>> seen = []
            >>> ctx = StepContext(tasks, None, {}, seen.append, lambda t: t, step=0)
            >>> ctx.weighted_backward({"t": torch.tensor(3.0)}, {"t": 2.0})
            >>> seen
            [tensor(12.)]
        """
        w = [self.tasks[t].weight * weights.get(t, 1.0) for t in losses]
        values = list(losses.values())
        if not values:
            return
        if all(v == 1.0 for v in w):
            total = values[0]
            for loss in values[1:]:
                total = total + loss
        elif len(values) > 1 and len({v.dtype for v in values}) == 1:
            # One stacked product: fewer autograd nodes than K multiplications and K-1 additions.
            stacked = torch.stack(values)
            total = torch.dot(stacked, torch.tensor(w, dtype=stacked.dtype, device=stacked.device))
        else:
            total = values[0] * w[0]
            for loss, v in zip(values[1:], w[1:], strict=True):
                total = total + loss * v
        self.backward(total)


class Balancer(nn.Module):
    """Base class: implement :meth:`backward`.

    Subclasses set ``name`` (the registry name). Optional hooks: :meth:`setup` (create per-task
    state), :meth:`on_epoch_end` and :meth:`on_evaluation` (dynamic weighting), :meth:`weights`
    (for logging), :meth:`task_parameters` and :meth:`optimizer_options` (learned weights).

    Example:
        >>> import torch
        >>> from mtlgraph.balancing import Balancer
        >>> class MaxLoss(Balancer):
        ...     name = "max_loss_doc"
        ...     def backward(self, losses, ctx):
        ...         ctx.backward(torch.stack(list(losses.values())).max())
        >>> MaxLoss().name
        'max_loss_doc'
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[str] = set()  # keys of messages already logged (see _say_once)

    @property
    def needs_outputs(self) -> bool:
        """Whether :meth:`backward` reads ``ctx.outputs`` (the step keeps them only then)."""
        return False

    def setup(self, tasks: Mapping[str, Task]) -> None:
        """Prepare per-task state for the model's tasks (called by the Trainer before it builds
        the optimizer; may be called again with more tasks, existing state is kept)."""

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        """Put the gradients of this step's combined objective into ``.grad``."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current per-task weights, for logging under ``model/all/train/weight/<task>``."""
        return {}

    def on_epoch_end(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        """Called after each epoch with the epoch's mean (unweighted) loss per task."""

    def on_evaluation(self, scores: Mapping[str, float]) -> None:
        """Called after each evaluation with the flat score dictionary."""

    def task_parameters(self, task_names: Sequence[str]) -> list[nn.Parameter] | None:
        """The balancer parameters a step on ``task_names`` can change (``None``: all of them).

        The Trainer's optimizer only visits these, so the cost of a step does not grow with the
        number of tasks the model holds.
        """
        return None

    def optimizer_options(self) -> dict[str, Any]:
        """Hyper-parameters of the balancer's optimizer group (e.g. ``{"lr": 0.1}``)."""
        return {}

    def _backward_single_task(self, weighted: Mapping[str, torch.Tensor], ctx: StepContext) -> bool:
        """Back-propagate a step that holds one task as it is (said once in the log), for
        methods that compare tasks; ``False`` (nothing done) when the step holds several."""
        if len(weighted) != 1:
            return False
        ((task_name, loss),) = weighted.items()
        self._say_once(
            "single",
            "%s: a step holds only task '%s', so its plain gradient is used (the method needs "
            "several tasks per step: use batch_scheduler='mixed' or datasets that label several "
            "tasks). Said once.",
            self.name,
            task_name,
        )
        ctx.backward(loss)
        return True

    def _say_once(self, key: str, message: str, *args: object) -> None:
        """Log a warning once per balancer instance."""
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)


def grown(
    vector: nn.Parameter, index: dict[str, int], tasks: Iterable[str], fill: float
) -> nn.Parameter:
    """The per-task ``vector`` (entry ``index[t]`` for task ``t``) with ``fill`` for each new task
    of ``tasks`` (added to ``index``) and the learned values kept; ``vector`` if none is new."""
    new = [t for t in tasks if t not in index]
    if not new:
        return vector
    for task_name in new:
        index[task_name] = len(index)
    old = vector.detach()
    out = torch.full((len(index),), fill, dtype=old.dtype, device=old.device)
    out[: len(old)] = old
    return nn.Parameter(out)


def require_non_negative(
    balancer: str, names: Sequence[str], values: Sequence[float], use: str = "takes the log of"
) -> None:
    """A ``ConfigError`` naming the tasks whose loss value is negative, for methods that take the
    log of the losses or divide by them (``use``); a non-finite value passes (under fp16 the grad
    scaler skips that step)."""
    bad = [t for t, v in zip(names, values, strict=True) if not v >= 0]
    if bad and all(math.isfinite(v) for v in values):
        raise ConfigError(
            [
                f"balancer '{balancer}' {use} the losses: task(s) {bad} have a negative loss; "
                "use a non-negative loss or another balancer"
            ]
        )


def saved_task_order(balancer: str, index: Mapping[str, int], saved: Sequence[str]) -> list[str]:
    """The tasks of ``index`` in position order; a ``ConfigError`` unless they are ``saved``'s."""
    mine = sorted(index, key=index.__getitem__)
    if list(saved) != mine:
        raise ConfigError(
            [
                f"balancer '{balancer}': the saved state holds tasks {list(saved)}, this balancer "
                f"was set up for {mine}; call setup(model.tasks) with the same tasks before "
                "load_state_dict"
            ]
        )
    return mine


class LastWeights(Balancer):
    """A balancer that logs the weights its last steps used (``self._last``, task -> weight).

    They are state too (``get_extra_state``), so a resumed run logs what an uninterrupted one
    does. Subclasses that add state extend ``get_extra_state``/``set_extra_state`` with
    ``super()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def weights(self) -> dict[str, float]:
        return dict(self._last)

    def get_extra_state(self) -> dict[str, Any]:
        return {"last": dict(self._last)}

    def set_extra_state(self, state: Any) -> None:
        self._last = dict(state["last"])


class Seeded(LastWeights):
    """A :class:`LastWeights` balancer with its own ``torch.Generator`` (no global random
    state), seeded with the integer ``seed`` and saved with the balancer's state.

    Raises:
        ConfigError: ``seed`` is not an integer (the message names the balancer).
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError([f"balancer '{self.name}': seed must be an integer, got {seed!r}"])
        super().__init__()
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self._gen.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._gen.set_state(state["generator"])
