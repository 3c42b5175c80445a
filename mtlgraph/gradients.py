"""Per-task gradients on the parameters a step's tasks share (used by the gradient-based
balancers and the interference probes), or at the shared representation they read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from mtlgraph._io import tensor_leaves
from mtlgraph.exceptions import GraphError
from mtlgraph.graph.model import ExecutionPlan
from mtlgraph.graph.plan import INPUT_ID, Source
from mtlgraph.graph.task import Task

__all__ = [
    "PlanCache",
    "Representation",
    "RepresentationRows",
    "SharedGradients",
    "SharedLayout",
    "accumulate_grad",
    "build_layout",
    "build_representation",
    "last_shared_layer",
    "plan_module",
    "representation_backward",
    "representation_rows",
    "representation_tensors",
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


def build_layout(
    tasks: Mapping[str, Task], plan: ExecutionPlan, rows: int | None = None
) -> SharedLayout:
    """The :class:`SharedLayout` of ``plan`` (uncached; :meth:`SharedGradients.layout` caches);
    its buffer holds ``rows`` rows (default: one per task of the plan)."""
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
    n_rows = len(plan.task_names) if rows is None else rows
    buffer = torch.empty(n_rows, offset, dtype=dtype, device=device)
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


# ---------------------------------------------------------------- representation-level gradients


@dataclass
class Representation:
    """Where the tasks of one execution plan leave its shared part: the tensors at which
    representation-level gradients are taken (``docs/balancing.md``).

    A node (an operation of the merged graph) is *shared* when its module is one of
    :func:`shared_modules`. Task ``t``'s representation nodes are the shared nodes whose output
    one of ``t``'s task-only operations reads without detaching it, and ``t``'s output node when
    it is shared. ``t``'s loss depends on the shared parameters only through them, so
    ``∇_{θ_s} L_t = Σ_z (∂z/∂θ_s)ᵀ ∂L_t/∂z``.

    Attributes:
        layout: The plan's shared and task-only parameters (its buffer has no rows: the
            per-task gradients live at the representation).
        nodes: Task name -> its representation node ids, in execution order.
        problems: Why this plan's representation does not carry every path from the shared
            parameters to the losses (empty when it does).
    """

    layout: SharedLayout
    nodes: dict[str, tuple[int, ...]]
    problems: list[str]


def _upstream(node: int, srcs: Mapping[int, tuple[Source, ...]]) -> set[int]:
    """``node`` and the nodes its output depends on through inputs that are not detached."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += [s for s, _, detach in srcs[n] if s != INPUT_ID and not detach]
    return seen


def build_representation(tasks: Mapping[str, Task], plan: ExecutionPlan) -> Representation:
    """The :class:`Representation` of ``plan`` (uncached: cache it in a :class:`PlanCache`).

    Per task, :func:`representation_rows` then takes one ``autograd.grad`` call from its loss
    to its representation tensors and own parameters (through its head only), and
    :func:`representation_backward` sends one combined representation gradient through the
    shared part in a single pass.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> from mtlgraph.gradients import build_representation, representation_rows
        >>> trunk = nn.Linear(2, 3)
        >>> ops = lambda t: [Operation("trunk", [("_input_", "x")]), Operation(t, ["trunk"])]
        >>> tasks = [Task(t, {"trunk": trunk, t: nn.Linear(3, 2)}, ops(t)) for t in ("a", "b")]
        >>> model = MultitaskClassifier(tasks)
        >>> rep = build_representation(model.tasks, model.plan(["a", "b"]))
        >>> rep.nodes, rep.problems
        ({'a': (0,), 'b': (0,)}, [])
        >>> outputs = []
        >>> X, Y = {"x": torch.randn(4, 2)}, {t: torch.tensor([0, 1, 1, 0]) for t in "ab"}
        >>> losses, _ = model.calculate_loss(X, Y, outputs=outputs)
        >>> representation_rows(rep, losses, outputs).rows.shape  # 2 tasks, 4 rows × 3 features
        torch.Size([2, 12])
    """
    shared_names = shared_modules(plan)
    names = {id(plan_module(tasks, plan, m)): m for m in plan.module_names}
    shared_ids = {id(plan_module(tasks, plan, m)) for m in shared_names}
    srcs = {n: s for n, _, s in plan.steps}
    module_of = {n: names[id(module)] for n, module, _ in plan.steps}
    shared = {n for n, module, _ in plan.steps if id(module) in shared_ids}
    nodes: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for task_name in plan.task_names:
        out = plan.outputs[task_name]
        path = _upstream(out, srcs)
        found = {out} & shared
        for n in path - shared:
            found |= {s for s, _, detach in srcs[n] if s in shared and not detach}
        nodes[task_name] = tuple(sorted(found))
        nested = sorted((a, b) for b in found for a in (_upstream(b, srcs) & found) - {b})
        if nested:
            first, then = (module_of[n] for n in nested[0])
            problems.append(
                f"task '{task_name}' reads the output of shared module '{first}' and that of "
                f"shared module '{then}', which depends on it: its gradient at the first would "
                "count the path through the second twice"
            )
    layout = build_layout(tasks, plan, rows=0)
    shared_params = {id(p) for p in layout.shared}
    for task_name, task_modules in plan.task_modules.items():
        for m in task_modules:
            if m not in shared_names and any(
                id(p) in shared_params for p in plan_module(tasks, plan, m).parameters()
            ):
                problems.append(
                    f"module '{m}' of task '{task_name}' holds parameters of a shared module, "
                    "so they reach that task's loss around its representation"
                )
    return Representation(layout, nodes, problems)


@dataclass
class RepresentationRows:
    """Per-task gradients at a step's representation (:func:`representation_rows`).

    Attributes:
        rows: ``(K, N)``: row ``i`` is ``∂(scaled L_i)/∂Z`` over all representation tensors of
            the step, flattened and concatenated (zero on the tensors task ``i`` does not read).
        tensors: The representation tensors ``Z`` (one per batch of the step and node, and per
            tensor inside a node's output), in the order of the columns.
    """

    rows: torch.Tensor
    tensors: list[torch.Tensor]


def representation_tensors(
    rep: Representation,
    task_names: Sequence[str],
    outputs: Sequence[tuple[ExecutionPlan, Mapping[int, Any]]],
) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """The representation tensors of a step's forward passes and, per task, the positions
    of its own among them (a task labelled by two batches reads both batches' tensors)."""
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}  # by identity: an identity module's output is its input
    where: dict[str, list[int]] = {t: [] for t in task_names}
    for plan, cache in outputs:
        for task_name in plan.task_names:
            if task_name not in where:
                continue
            for n in rep.nodes[task_name]:
                for z in tensor_leaves(cache[n]):
                    if not (z.requires_grad and z.is_floating_point()):
                        continue
                    if id(z) not in index:
                        index[id(z)] = len(tensors)
                        tensors.append(z)
                    if index[id(z)] not in where[task_name]:
                        where[task_name].append(index[id(z)])
    return tensors, where


def representation_rows(
    rep: Representation,
    losses: Mapping[str, torch.Tensor],
    outputs: Sequence[tuple[ExecutionPlan, Mapping[int, Any]]],
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RepresentationRows:
    """Each task's gradient at the representation (the rows) and, added to their
    ``.grad``, at its task-only parameters.

    Args:
        rep: The step plan's representation (``losses`` holds some or all of its tasks).
        losses: Task name -> scalar loss; one ``autograd.grad`` call each, from the loss to
            its representation tensors and task-only parameters (the graph is kept for
            :func:`representation_backward`).
        outputs: ``(plan, node id -> output)`` of each forward pass of the step
            (``MultitaskClassifier.calculate_loss(..., outputs=...)``).
        scale: Applied to each loss first (loss scaling under mixed precision).
        reduce: Under DDP, averages a gradient over the ranks in place: applied to the
            task-only gradients (the rows belong to this rank's examples and stay local).
    """
    names = list(losses)
    tensors, where = representation_tensors(rep, names, outputs)
    sizes = [z.numel() for z in tensors]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    dtype = tensors[0].dtype if tensors else torch.float32
    device = tensors[0].device if tensors else rep.layout.buffer.device
    rows = torch.zeros(len(names), offsets[-1], dtype=dtype, device=device)
    for i, task_name in enumerate(names):
        own = rep.layout.own[task_name]
        mine = where[task_name]
        inputs: list[torch.Tensor] = [tensors[j] for j in mine]
        loss = losses[task_name] if scale is None else scale(losses[task_name])
        grads = torch.autograd.grad(
            loss,
            [*inputs, *own],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for j, g in zip(mine, grads, strict=False):
            rows[i, offsets[j] : offsets[j + 1]] = g.reshape(-1)
        for p, g in zip(own, grads[len(mine) :], strict=True):
            accumulate_grad(p, g if reduce is None else reduce(g))
    return RepresentationRows(rows, tensors)


def representation_backward(
    rep: Representation,
    tensors: Sequence[torch.Tensor],
    direction: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Add ``(∂Z/∂θ_s)ᵀ direction`` to the shared parameters' ``.grad``: one backward pass
    from the representation tensors (``direction`` is flat, in their column order); under
    DDP averaged over the ranks first (``reduce``)."""
    shared = rep.layout.shared
    if not tensors and reduce is None:
        return
    grads: Sequence[torch.Tensor]
    if tensors:
        parts = direction.split([z.numel() for z in tensors])
        grads = torch.autograd.grad(
            tensors,
            shared,
            [d.view_as(z) for d, z in zip(parts, tensors, strict=True)],
            allow_unused=True,
            materialize_grads=True,
        )
    else:  # nothing to send back, but a DDP rank still joins the collective below
        grads = [torch.zeros_like(p) for p in shared]
    if reduce is not None:  # one collective for all of them
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
        slices = rep.layout.slices
        grads = tuple(flat[o : o + n].view_as(p) for p, (o, n) in zip(shared, slices, strict=True))
    for p, g in zip(shared, grads, strict=True):
        accumulate_grad(p, g)
