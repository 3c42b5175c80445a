"""Per-task gradients on the parameters a step's tasks share (used by the gradient-based
balancers and the interference probes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import nn

from mtlgraph.exceptions import GraphError
from mtlgraph.graph.model import ExecutionPlan
from mtlgraph.graph.task import Task

__all__ = [
    "PlanCache",
    "SharedGradients",
    "SharedLayout",
    "accumulate_grad",
    "build_layout",
    "last_shared_layer",
    "plan_module",
    "shared_modules",
]

V = TypeVar("V")


class PlanCache(Generic[V]):
    """Values computed from an execution plan, valid for that plan object only.

    Keyed weakly by the plan (by identity): it keeps no plan alive, and a new plan never gets
    an old plan's entry.

    Example:
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> from mtlgraph.gradients import PlanCache
        >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
        >>> model = MultitaskClassifier([task])
        >>> cache = PlanCache[tuple[str, ...]]()
        >>> cache.get(model.plan(["t"]), lambda plan: plan.module_names)
        ('m',)
        >>> len(cache)
        1
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[ExecutionPlan, V] = weakref.WeakKeyDictionary()

    def get(self, plan: ExecutionPlan, build: Callable[[ExecutionPlan], V]) -> V:
        """The cached value of ``plan``, built by ``build(plan)`` on first use."""
        if plan not in self._entries:
            self._entries[plan] = build(plan)
        return self._entries[plan]

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def items(self) -> list[tuple[ExecutionPlan, V]]:
        """``(plan, value)`` of every entry (their plans are alive)."""
        return list(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict[str, object]:
        return {}  # a copy or a pickle starts empty (weak references do not travel)

    def __setstate__(self, state: dict[str, object]) -> None:
        self._entries = weakref.WeakKeyDictionary()


@dataclass
class SharedLayout:
    """Where the shared parameters of one execution plan live in a flat per-task gradient buffer.

    Attributes:
        task_names: The plan's tasks: row ``i`` of :attr:`buffer` is task ``i``'s gradient.
        shared: Trainable parameters of the modules more than one of the tasks uses.
        slices: ``(offset, numel)`` of each shared parameter in a buffer row.
        modules: ``(module name, start, stop)``: each shared module's columns of a buffer row.
        own: Task name -> trainable parameters only that task uses.
        buffer: ``(K, P)`` preallocated rows, one flattened shared gradient per task.
        size: ``P``, the number of shared parameter values.
    """

    task_names: tuple[str, ...]
    shared: list[nn.Parameter]
    slices: list[tuple[int, int]]
    modules: list[tuple[str, int, int]]
    own: dict[str, list[nn.Parameter]]
    buffer: torch.Tensor
    size: int = field(default=0)


def shared_modules(plan: ExecutionPlan) -> list[str]:
    """Modules used by more than one of the plan's tasks, in execution order."""
    users: dict[str, int] = {}
    for modules in plan.task_modules.values():
        for m in modules:
            users[m] = users.get(m, 0) + 1
    return [m for m in plan.module_names if users[m] > 1]


def plan_module(tasks: Mapping[str, Task], plan: ExecutionPlan, module_name: str) -> nn.Module:
    """The module object named ``module_name`` in ``plan`` (from the pool of a task using it)."""
    for task_name, modules in plan.task_modules.items():
        if module_name in modules:
            return tasks[task_name].module_pool[module_name]
    raise GraphError([f"no task of the plan uses module '{module_name}'"])  # pragma: no cover


def last_shared_layer(tasks: Mapping[str, Task], plan: ExecutionPlan) -> list[nn.Parameter]:
    """Trainable parameters of the last parameterised layer of the last shared module."""
    shared = set(shared_modules(plan))
    first_task = plan.task_names[0]
    for module_name in reversed(plan.task_modules[first_task]):
        if module_name not in shared:
            continue
        layers = [
            m
            for m in plan_module(tasks, plan, module_name).modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if layers:
            return [p for p in layers[-1].parameters(recurse=False) if p.requires_grad]
    return []


def accumulate_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    """``p.grad += g`` (``p.grad = g`` when it has none yet)."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _trainable(module: nn.Module, seen: set[int]) -> list[nn.Parameter]:
    """Trainable parameters of ``module`` not in ``seen`` (which they join)."""
    out = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def build_layout(tasks: Mapping[str, Task], plan: ExecutionPlan) -> SharedLayout:
    """The :class:`SharedLayout` of ``plan`` (uncached; :meth:`SharedGradients.layout` caches)."""
    shared_names = shared_modules(plan)
    seen: set[int] = set()
    shared: list[nn.Parameter] = []
    modules: list[tuple[str, int, int]] = []
    slices: list[tuple[int, int]] = []
    offset = 0
    for m in shared_names:
        params = _trainable(plan_module(tasks, plan, m), seen)
        start = offset
        for p in params:
            slices.append((offset, p.numel()))
            offset += p.numel()
        if offset > start:
            modules.append((m, start, offset))
        shared += params
    own = {
        task_name: [
            p
            for m in task_modules
            if m not in shared_names
            for p in _trainable(plan_module(tasks, plan, m), seen)
        ]
        for task_name, task_modules in plan.task_modules.items()
    }
    dtype = shared[0].dtype if shared else torch.float32
    device = shared[0].device if shared else torch.device("cpu")
    buffer = torch.empty(len(plan.task_names), offset, dtype=dtype, device=device)
    return SharedLayout(plan.task_names, shared, slices, modules, own, buffer, offset)


class SharedGradients:
    """One gradient per task on the shared parameters of a step, in a preallocated buffer.

    Layouts are cached per execution plan; :meth:`clear` forgets them (after freezing).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> from mtlgraph.gradients import SharedGradients
        >>> trunk = nn.Linear(2, 1, bias=False)
        >>> ops = lambda t: [Operation("trunk", [("_input_", "x")]), Operation(t, ["trunk"])]
        >>> tasks = [Task(t, {"trunk": trunk, t: nn.Linear(1, 2)}, ops(t)) for t in ("a", "b")]
        >>> model = MultitaskClassifier(tasks)
        >>> layout = SharedGradients().layout(model.tasks, model.plan(["a", "b"]))
        >>> layout.modules, layout.size
        ([('trunk', 0, 2)], 2)
    """

    def __init__(self) -> None:
        self._layouts = PlanCache[SharedLayout]()

    def clear(self) -> None:
        """Forget the cached layouts."""
        self._layouts.clear()

    def layout(self, tasks: Mapping[str, Task], plan: ExecutionPlan) -> SharedLayout:
        """The (cached) :class:`SharedLayout` of ``plan``."""
        return self._layouts.get(plan, lambda p: build_layout(tasks, p))

    @staticmethod
    def compute(
        layout: SharedLayout,
        losses: Mapping[str, torch.Tensor],
        scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
        accumulate_own: bool = False,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Row ``i`` of the layout's buffer := ``∇_{θ_s} scale(losses[i])`` for the tasks of
        ``losses`` in order; returns those rows.

        Args:
            layout: The plan's layout (``losses`` holds some or all of its tasks).
            losses: Task name -> scalar loss; one backward pass each through its path.
            scale: Applied to each loss first (loss scaling under mixed precision).
            accumulate_own: Also add each task's gradient of its task-only parameters to their
                ``.grad``.
            reduce: Under DDP, averages a gradient over the ranks in place (``StepContext.reduce``):
                applied to the task-only gradients and to the returned rows, so every rank
                combines the same rank-averaged gradients.
        """
        names = list(losses)
        n_shared = len(layout.shared)
        buffer = layout.buffer
        for i, task_name in enumerate(names):
            own = layout.own[task_name] if accumulate_own else []
            loss = losses[task_name] if scale is None else scale(losses[task_name])
            grads = torch.autograd.grad(
                loss,
                layout.shared + own,
                retain_graph=i < len(names) - 1,
                allow_unused=True,
                materialize_grads=True,
            )
            torch.cat([g.reshape(-1) for g in grads[:n_shared]], out=buffer[i])
            for p, g in zip(own, grads[n_shared:], strict=True):
                accumulate_grad(p, g if reduce is None else reduce(g))
        rows = buffer[: len(names)]
        if reduce is not None:
            reduce(rows)
        return rows
