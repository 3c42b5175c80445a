"""Per-task gradients on the parameters a step's tasks share (used by the gradient-based
balancers and the interference probes), or at the shared representation they read.
"""

from __future__ import annotations

import logging
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
    "VMAP_REFUSALS",
    "PlanCache",
    "Representation",
    "RepresentationRows",
    "SharedGradients",
    "SharedLayout",
    "accumulate_grad",
    "batched_blocks",
    "build_layout",
    "build_representation",
    "gram_chunks",
    "gramian",
    "last_shared_layer",
    "own_gradients",
    "plan_module",
    "representation_backward",
    "representation_rows",
    "representation_tensors",
    "shared_modules",
    "task_rows",
    "vmap_refused",
]

logger = logging.getLogger(__name__)

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
        size: ``P``, the number of shared parameter values.
        rows: Rows of :attr:`buffer` (``None``: one per task; ``0`` for a representation's
            layout, whose per-task gradients live at the representation).
        batched: Whether a vmapped backward pass gives several tasks' gradients at once (see
            :func:`task_rows`): ``None`` until the plan's first multi-task step tries it.
        tasks_per_pass: Most tasks one vmapped pass takes (``0``: all; ``1``: one pass per
            task; ``None``: all where the shared parameters live on an accelerator, one pass
            per task on the CPU, where batching measured slower). The pass's transient memory
            is that many times each activation's gradient.
    """

    task_names: tuple[str, ...]
    shared: list[nn.Parameter]
    slices: list[tuple[int, int]]
    modules: list[tuple[str, int, int]]
    own: dict[str, list[nn.Parameter]]
    size: int = field(default=0)
    batched: bool | None = None
    tasks_per_pass: int | None = None
    rows: int | None = None
    _buffer: torch.Tensor | None = field(default=None, repr=False)

    @property
    def buffer(self) -> torch.Tensor:
        """``(rows, P)`` (``rows``: default one per task), one flattened shared gradient per
        task; allocated on first use, so the Gram path (:func:`gramian`), which never asks for
        it, holds no ``K × P`` buffer."""
        if self._buffer is None:
            like = self.shared[0] if self.shared else torch.empty(0)
            n = len(self.task_names) if self.rows is None else self.rows
            self._buffer = like.new_empty(n, self.size)
        return self._buffer


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
    its buffer holds ``rows`` rows (default: one per task of the plan) once it is used."""
    shared_names = shared_modules(plan)
    # shared by identity, not only by name: a base that per-task adapters run is a submodule
    # of each adapter, so its trainable weights are shared though no module name is
    users: dict[int, int] = {}
    for task_modules in plan.task_modules.values():
        ids = {id(p) for m in task_modules for p in plan_module(tasks, plan, m).parameters()}
        for i in ids:
            users[i] = users.get(i, 0) + 1
    seen: set[int] = set()
    shared: list[nn.Parameter] = []
    modules: list[tuple[str, int, int]] = []
    slices: list[tuple[int, int]] = []
    offset = 0
    for m in plan.module_names:
        module = plan_module(tasks, plan, m)
        params = [
            p
            for p in module.parameters()
            if p.requires_grad and users.get(id(p), 0) > 1 and id(p) not in seen
        ]
        seen.update(id(p) for p in params)
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
    layout = SharedLayout(plan.task_names, shared, slices, modules, own, offset)
    layout.rows = rows
    return layout


class SharedGradients:
    """One gradient per task on the shared parameters of a step, in a preallocated buffer.

    Layouts are cached per execution plan; :meth:`clear` forgets them (after freezing).

    Args:
        tasks_per_pass: Most tasks one vmapped backward pass takes (:func:`task_rows`; ``0``:
            all the step's tasks, ``1``: one pass per task, ``None``: all on an accelerator,
            one each on the CPU); set on each layout it returns.

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

    def __init__(self, tasks_per_pass: int | None = None) -> None:
        self._layouts = PlanCache[SharedLayout]()
        self.tasks_per_pass = tasks_per_pass

    def clear(self) -> None:
        """Forget the cached layouts."""
        self._layouts.clear()

    def layout(self, tasks: Mapping[str, Task], plan: ExecutionPlan) -> SharedLayout:
        """The (cached) :class:`SharedLayout` of ``plan``."""
        layout = self._layouts.get(plan, lambda p: build_layout(tasks, p))
        layout.tasks_per_pass = self.tasks_per_pass
        return layout

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
            losses: Task name -> scalar loss; their gradients come from one vmapped backward
                pass, or one pass each where that is refused (see :func:`task_rows`).
            scale: Applied to each loss first (loss scaling under mixed precision).
            accumulate_own: Also add each task's gradient of its task-only parameters to their
                ``.grad``.
            reduce: Under DDP, averages a gradient over the ranks in place (``StepContext.reduce``):
                applied to the task-only gradients and to the returned rows, so every rank
                combines the same rank-averaged gradients.
        """
        names = list(losses)
        scaled = [losses[t] if scale is None else scale(losses[t]) for t in names]
        if accumulate_own:
            own_gradients(layout, names, scaled, reduce)
        rows = layout.buffer[: len(names)]
        task_rows(layout, layout.shared, scaled, rows, retain_graph=False)
        if reduce is not None:
            reduce(rows)
        return rows


VMAP_REFUSALS = ("Batching rule not implemented", "vmap", "functorch")
"""Phrases of the errors with which PyTorch refuses to batch a backward pass over the tasks (an
operation without a batching rule that has no fallback, ``.item()`` or an in-place write into an
unbatched tensor inside a backward, an ``autograd.Function`` that cannot be vmapped): such a
``RuntimeError`` makes :func:`task_rows` fall back to one pass per task."""


def vmap_refused(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch refusing to vmap a backward pass (:data:`VMAP_REFUSALS`).

    Example:
        >>> vmap_refused(RuntimeError("Batching rule not implemented for aten::item."))
        True
        >>> vmap_refused(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    return isinstance(error, RuntimeError) and any(p in str(error) for p in VMAP_REFUSALS)


def own_gradients(
    layout: SharedLayout,
    names: Sequence[str],
    losses: Sequence[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Add each task's gradient of its task-only parameters to their ``.grad``, in one backward
    pass of ``Σ losses`` (a task-only parameter reaches one loss only, so that sum's gradient is
    its task's); the graph is kept for the shared gradients that follow."""
    own = [p for t in names for p in layout.own[t]]
    if not own:
        return
    total = losses[0] if len(losses) == 1 else torch.stack(list(losses)).sum()
    grads = torch.autograd.grad(
        total, own, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    for p, g in zip(own, grads, strict=True):
        accumulate_grad(p, g if reduce is None else reduce(g))


def task_rows(
    layout: SharedLayout,
    params: Sequence[nn.Parameter],
    losses: Sequence[torch.Tensor],
    out: torch.Tensor,
    retain_graph: bool,
) -> None:
    """``out[i] := ∇_params losses[i]`` flattened (``out``: ``(len(losses), Σ numel)``).

    The rows come from ``torch.autograd.grad(..., is_grads_batched=True)`` calls (a vmap over
    one-hot gradients of the stacked losses), ``layout.tasks_per_pass`` tasks a call (``0``: all
    in one; ``None``: all off the CPU, one on it), when the losses share a dtype and there are
    several. The plan's first such call
    keeps the graph and is the trial: a ``RuntimeError`` of :data:`VMAP_REFUSALS` sets
    ``layout.batched = False`` (logged once), and that plan takes one backward pass per task
    from then on; any other error propagates. Both give the same rows (to float rounding).
    """
    blocks = batched_blocks(layout, params, losses, retain_graph)
    if blocks is None:
        _per_task_rows(params, losses, out, retain_graph)
    else:
        torch.cat(blocks, dim=1, out=out)


def batched_blocks(
    layout: SharedLayout,
    params: Sequence[nn.Parameter],
    losses: Sequence[torch.Tensor],
    retain_graph: bool,
) -> list[torch.Tensor] | None:
    """The Jacobian of ``losses`` on ``params`` as one ``(K, numel)`` block per parameter, from
    vmapped passes (:func:`task_rows` says when); ``None`` where one pass per task is due."""
    k = len(losses)
    width = layout.tasks_per_pass
    if width is None:  # batched off the CPU only: on a CPU it measured slower and larger
        width = 1 if not params or params[0].device.type == "cpu" else k
    width = width or k
    batchable = k > 1 and width > 1 and len({loss.dtype for loss in losses}) == 1
    if not batchable or layout.batched is False:
        return None
    trial = layout.batched is None
    try:
        blocks = _batched_blocks(params, losses, width, retain_graph or trial)
    except RuntimeError as e:
        if not vmap_refused(e):
            raise
        if not trial:  # batched before on this plan: a data-dependent refusal
            e.add_note(
                f"mtlgraph: in the batched backward pass of tasks {list(layout.task_names)}, "
                "which worked on this plan's first step; GradientBalancer.tasks_per_pass = 1 "
                "takes one pass per task"
            )
            raise
        layout.batched = False
        logger.info(
            "tasks %s: PyTorch cannot batch their backward pass (%s); their gradients take "
            "one backward pass each",
            list(layout.task_names),
            str(e).splitlines()[0],
        )
        return None
    layout.batched = True
    return blocks


def _batched_blocks(
    params: Sequence[nn.Parameter],
    losses: Sequence[torch.Tensor],
    width: int,
    retain_graph: bool,
) -> list[torch.Tensor]:
    """:func:`batched_blocks` in passes of ``width`` tasks (unused parameters: zero blocks)."""
    k = len(losses)
    stacked = torch.stack(list(losses))
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    blocks: list[torch.Tensor] = []
    for start in range(0, k, width):
        stop = min(start + width, k)
        grads = torch.autograd.grad(
            stacked,
            list(params),
            grad_outputs=eye[start:stop],
            retain_graph=retain_graph or stop < k,
            allow_unused=True,
            is_grads_batched=True,
        )
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            rows = (
                p.new_zeros(stop - start, p.numel()) if g is None else g.reshape(stop - start, -1)
            )
            if start == 0 and stop == k:
                blocks.append(rows)  # one pass: autograd's own tensors, no copy
            elif start == 0:
                blocks.append(p.new_empty(k, p.numel()))
                blocks[i][:stop] = rows
            else:
                blocks[i][start:stop] = rows
    return blocks


def _per_task_rows(
    params: Sequence[nn.Parameter],
    losses: Sequence[torch.Tensor],
    out: torch.Tensor,
    retain_graph: bool,
) -> None:
    """:func:`task_rows` with one backward pass per task."""
    for i, loss in enumerate(losses):
        last = i == len(losses) - 1
        grads = torch.autograd.grad(
            loss,
            list(params),
            retain_graph=retain_graph or not last,
            allow_unused=True,
            materialize_grads=True,
        )
        torch.cat([g.reshape(-1) for g in grads], out=out[i])


def gram_chunks(params: Sequence[nn.Parameter], rows: int, max_values: int) -> list[slice]:
    """``params`` cut, in order, into runs whose Jacobian (``rows × Σ numel``) holds at most
    ``max_values`` values, or one parameter where a single one holds more."""
    chunks: list[slice] = []
    start, values = 0, 0
    for i, p in enumerate(params):
        if i > start and values + rows * p.numel() > max_values:
            chunks.append(slice(start, i))
            start, values = i, 0
        values += rows * p.numel()
    if params:
        chunks.append(slice(start, len(params)))
    return chunks


def gramian(
    layout: SharedLayout,
    losses: Sequence[torch.Tensor],
    max_values: int = 1 << 24,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Gram matrix ``M_ij = g_i·g_j`` (``(K, K)``, float64) of the losses' gradients on the
    shared parameters, without their ``K × P`` rows: the Jacobian is computed a chunk of
    parameters at a time (:func:`task_rows`, graph kept) and ``M += J_c J_cᵀ``; a chunk holds at
    most ``max_values`` values (or one parameter). ``reduce`` (DDP) averages each chunk over the
    ranks first, which makes ``M`` the Gram matrix of the rank-averaged gradients, exactly as
    the rows path computes it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> from mtlgraph.gradients import SharedGradients, gramian
        >>> trunk = nn.Linear(2, 1, bias=False)
        >>> ops = lambda t: [Operation("trunk", [("_input_", "x")]), Operation(t, ["trunk"])]
        >>> tasks = [Task(t, {"trunk": trunk, t: nn.Linear(1, 2)}, ops(t)) for t in "ab"]
        >>> model = MultitaskClassifier(tasks)
        >>> layout = SharedGradients().layout(model.tasks, model.plan(["a", "b"]))
        >>> x = {"x": torch.randn(4, 2)}
        >>> losses, _ = model.calculate_loss(x, {t: torch.tensor([0, 1, 1, 0]) for t in "ab"})
        >>> rows = SharedGradients.compute(layout, losses).clone()
        >>> losses, _ = model.calculate_loss(x, {t: torch.tensor([0, 1, 1, 0]) for t in "ab"})
        >>> m = gramian(layout, list(losses.values()))
        >>> torch.allclose(m, (rows @ rows.T).double())
        True
    """
    k = len(losses)
    like = layout.shared[0]
    total = torch.zeros(k, k, dtype=torch.float64, device=like.device)
    for chunk in gram_chunks(layout.shared, k, max_values):
        params = layout.shared[chunk]
        blocks = batched_blocks(layout, params, losses, retain_graph=True)
        if blocks is None:
            blocks = [like.new_empty(k, sum(p.numel() for p in params))]
            _per_task_rows(params, losses, blocks[0], retain_graph=True)
        for block in blocks:
            if reduce is not None:
                reduce(block)
            total += (block @ block.T).double()
        del blocks  # one chunk's Jacobian at a time
    return total


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
