"""How a step's per-task losses become one update of the parameters.

A :class:`Balancer` receives the step's per-task losses and is responsible for putting gradients
into ``.grad`` (it calls ``ctx.backward``, or writes ``.grad`` itself). Two families:

- **Loss-based** (one backward pass): ``sum``, ``uncertainty``, ``dwa``, ``gradnorm``,
  ``inverse_metric``, ``rlw`` combine the losses into one weighted scalar.
- **Gradient-based** (one gradient per task on the shared parameters): ``pcgrad``, ``cagrad``,
  ``mgda`` combine per-task gradients of the shared parameters into one direction; parameters that
  only one task of the step uses get that task's own gradient.

Every balancer applies the static ``Task.weight`` first (it multiplies the task's loss). Balancers
are ``nn.Module`` objects: learned weights are parameters (optimised by the Trainer, in their own
optimizer group), and all other state (loss histories, initial losses, metric weights, random
generators) travels in ``state_dict()`` as tensors and plain values, so a checkpoint loads with
``torch.load(weights_only=True)`` and a resumed run continues bit-exactly.

Life cycle, driven by the :class:`~mtlgraph.Trainer`: ``setup(model.tasks)`` (before the optimizer
is built; call it before ``load_state_dict`` too), then per step ``backward(losses, ctx)``,
``on_epoch_end`` after each epoch and ``on_evaluation`` after each evaluation. The formulas are in
``docs/balancing.md``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.model import ExecutionPlan
from mtlgraph.graph.task import Task
from mtlgraph.metrics import split_key

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
    """

    tasks: Mapping[str, Task]
    plan: ExecutionPlan
    counts: Mapping[str, int]
    backward: Callable[[torch.Tensor], None]
    scale: Callable[[torch.Tensor], torch.Tensor]
    step: int
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)


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

    def _say_once(self, key: str, message: str, *args: object) -> None:
        """Log a warning once per balancer instance."""
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)


def _static(losses: Mapping[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
    """Each loss times its task's static ``Task.weight``."""
    out = {}
    for task_name, loss in losses.items():
        w = ctx.tasks[task_name].weight
        out[task_name] = loss if w == 1.0 else loss * w
    return out


def _weighted_backward(
    losses: Mapping[str, torch.Tensor], weights: Mapping[str, float], ctx: StepContext
) -> None:
    """``ctx.backward(Σ_i weights[i] · Task.weight_i · L_i)`` (missing weights count as 1)."""
    w = [ctx.tasks[t].weight * weights.get(t, 1.0) for t in losses]
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
    ctx.backward(total)


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise(name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(
            problems, header=f"invalid balancer '{name}':" if len(problems) > 1 else None
        )


def _seeded_generator(balancer: str, seed: object) -> torch.Generator:
    """The balancer's own generator (no global random state), seeded with an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError([f"balancer '{balancer}': seed must be an integer, got {seed!r}"])
    return torch.Generator().manual_seed(seed)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ====================================================================== loss-based


class _LastWeights(Balancer):
    """A balancer that logs the weights its last steps used; they are state too, so a resumed
    run logs what an uninterrupted one does."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def weights(self) -> dict[str, float]:
        return dict(self._last)

    def get_extra_state(self) -> dict[str, Any]:
        return {"last": dict(self._last)}

    def set_extra_state(self, state: Any) -> None:
        self._last = dict(state["last"])


class SumBalancer(_LastWeights):
    """``L = Σ_i w_i · L_i`` with ``w_i = Task.weight`` (1 by default).

    Example:
        >>> from mtlgraph.balancing import make_balancer
        >>> make_balancer("sum").name
        'sum'
    """

    name = "sum"

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


class UncertaintyBalancer(Balancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Learns ``s_i = log σ_i²`` per task (a parameter, trained with the model). Regression tasks
    use the Gaussian form ``½·exp(−s_i)·L_i + ½·s_i``, the other task types the softmax form
    ``exp(−s_i)·L_i + ½·s_i``. The logged weight is ``exp(−s_i)``.

    Args:
        init: Initial ``s_i`` (0 means weight 1).
        lr: Learning rate of the ``s_i`` (``None``: the Trainer's ``lr``).
        forms: Optional ``{task: "regression" | "classification"}`` overriding the form chosen
            from the task type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> from mtlgraph.balancing import UncertaintyBalancer
        >>> task = Task("t", {"m": nn.Linear(2, 1)}, [Operation("m", [("_input_", "x")])],
        ...             task_type="regression")
        >>> b = UncertaintyBalancer(init=0.5)
        >>> b.setup({"t": task})
        >>> round(b.weights()["t"], 4)  # exp(-0.5)
        0.6065
    """

    name = "uncertainty"

    def __init__(
        self, init: float = 0.0, lr: float | None = None, forms: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        problems: list[str] = []
        _check(problems, _is_number(init), f"init must be a finite number, got {init!r}")
        _check(
            problems,
            lr is None or (_is_number(lr) and lr > 0),
            f"lr must be a positive number or None, got {lr!r}",
        )
        for task_name, form in (forms or {}).items():
            _check(
                problems,
                form in ("regression", "classification"),
                f"forms['{task_name}'] must be 'regression' or 'classification', got {form!r}",
            )
        _raise(self.name, problems)
        self.init = float(init)
        self.lr = lr
        self.forms: dict[str, str] = dict(forms or {})
        # s_i of every task in one vector (one optimizer parameter, however many tasks)
        self.log_vars = nn.Parameter(torch.zeros(0))
        self._index: dict[str, int] = {}  # task -> position in log_vars
        self._half: dict[str, bool] = {}  # task -> uses the regression form (factor ½)
        self._rows: dict[tuple[str, ...], torch.Tensor | None] = {}  # step tasks -> indices
        self._factors: dict[tuple[float, ...], torch.Tensor] = {}  # factors -> tensor

    def setup(self, tasks: Mapping[str, Task]) -> None:
        unknown = [t for t in self.forms if t not in tasks]
        if unknown:
            raise ConfigError(
                [
                    f"balancer 'uncertainty': forms names unknown task '{t}'"
                    f"{did_you_mean(t, tasks)}; the model has {quoted(tasks)}"
                    for t in unknown
                ]
            )
        new = [t for t in tasks if t not in self._index]
        if new:  # grow the vector, keeping the values learned so far
            for task_name in new:
                self._index[task_name] = len(self._index)
            old = self.log_vars.detach()
            grown = torch.full((len(self._index),), self.init, dtype=old.dtype, device=old.device)
            grown[: len(old)] = old
            self.log_vars = nn.Parameter(grown)
            self._rows = {}
        for task_name, task in tasks.items():
            default = "regression" if task.task_type == "regression" else "classification"
            self._half[task_name] = self.forms.get(task_name, default) == "regression"

    def _select(self, names: tuple[str, ...]) -> torch.Tensor:
        """The step's ``s_i`` (the whole vector when the step holds every task in order)."""
        if names not in self._rows:
            rows = [self._index[t] for t in names]
            self._rows[names] = (
                None
                if rows == list(range(len(self._index)))
                else torch.tensor(rows, device=self.log_vars.device)
            )
        rows_t = self._rows[names]
        if rows_t is None:
            return self.log_vars
        if rows_t.device != self.log_vars.device:
            rows_t = self._rows[names] = rows_t.to(self.log_vars.device)
        return self.log_vars[rows_t]

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        names = tuple(losses)
        s = self._select(names)
        # factor_i = Task.weight_i · (½ for the regression form, 1 otherwise)
        factor = tuple(ctx.tasks[t].weight * (0.5 if self._half[t] else 1.0) for t in names)
        values = list(losses.values())
        if len({v.dtype for v in values}) > 1:
            values = [v.float() for v in values]
        stacked = torch.stack(values)
        f = self._factors.get(factor)
        if f is None or f.dtype != stacked.dtype or f.device != stacked.device:
            f = self._factors[factor] = torch.tensor(
                factor, dtype=stacked.dtype, device=stacked.device
            )
        total = torch.dot(f * stacked, torch.exp(-s)) + 0.5 * s.sum()
        ctx.backward(total)

    def weights(self) -> dict[str, float]:
        values = torch.exp(-self.log_vars.detach()).tolist()
        return {t: float(values[i]) for t, i in self._index.items()}

    def task_parameters(self, task_names: Sequence[str]) -> list[nn.Parameter]:
        return [self.log_vars]

    def optimizer_options(self) -> dict[str, Any]:
        return {} if self.lr is None else {"lr": self.lr}

    def get_extra_state(self) -> dict[str, Any]:
        order = sorted(self._index, key=self._index.__getitem__)
        return {"tasks": order, "regression_form": [self._half.get(t, False) for t in order]}

    def set_extra_state(self, state: Any) -> None:
        order = list(state["tasks"])
        mine = sorted(self._index, key=self._index.__getitem__)
        if order != mine:
            raise ConfigError(
                [
                    f"balancer 'uncertainty': the saved state holds tasks {order}, this balancer "
                    f"was set up for {mine}; call setup(model.tasks) with the same tasks before "
                    "load_state_dict"
                ]
            )
        self._half = dict(zip(order, state["regression_form"], strict=True))


class DWABalancer(Balancer):
    """Dynamic weight average (Liu, Johns & Davison, CVPR 2019).

    With ``L̄_k(e)`` the mean loss of task ``k`` over epoch ``e``: ``r_k = L̄_k(e−1)/L̄_k(e−2)`` and
    ``w_k(e) = K·exp(r_k/T) / Σ_j exp(r_j/T)``; ``w_k = 1`` until a task has two epochs of
    history. Tasks whose loss falls slowly get more weight.

    Args:
        temperature: ``T``; larger values flatten the weights toward 1.

    Example:
        >>> from mtlgraph.balancing import DWABalancer
        >>> b = DWABalancer(temperature=2.0)
        >>> b.on_epoch_end(0, {"a": 1.0, "b": 1.0})
        >>> b.on_epoch_end(1, {"a": 0.5, "b": 1.0})
        >>> {t: round(w, 4) for t, w in b.weights().items()}
        {'a': 0.8756, 'b': 1.1244}
    """

    name = "dwa"

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        problems: list[str] = []
        _check(
            problems,
            _is_number(temperature) and temperature > 0,
            f"temperature must be a positive number, got {temperature!r}",
        )
        _raise(self.name, problems)
        self.temperature = float(temperature)
        self._history: dict[str, list[float]] = {}  # task -> mean losses of its last two epochs
        self._weights: dict[str, float] = {}

    def on_epoch_end(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        for task_name, value in mean_losses.items():
            history = self._history.setdefault(task_name, [])
            history.append(float(value))
            del history[:-2]
        ready = {t: h for t, h in self._history.items() if len(h) == 2}
        if not ready:
            return
        ratios = {t: h[1] / max(h[0], 1e-12) for t, h in ready.items()}
        top = max(ratios.values())
        exps = {t: math.exp((r - top) / self.temperature) for t, r in ratios.items()}
        norm = sum(exps.values())
        self._weights = {t: len(exps) * e / norm for t, e in exps.items()}

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        _weighted_backward(losses, self._weights, ctx)

    def weights(self) -> dict[str, float]:
        return {t: self._weights.get(t, 1.0) for t in self._history}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "history": {t: list(h) for t, h in self._history.items()},
            "weights": dict(self._weights),
        }

    def set_extra_state(self, state: Any) -> None:
        self._history = {t: [float(v) for v in h] for t, h in state["history"].items()}
        self._weights = {t: float(w) for t, w in state["weights"].items()}


class GradNormBalancer(Balancer):
    """GradNorm (Chen et al., ICML 2018): weights that equalise gradient norms and learning pace.

    Trainable weights ``w_i`` (init 1). On the last shared layer ``W``:
    ``G_i = ‖∇_W (w_i L_i)‖₂``, ``Ḡ = mean_i G_i``, ``L̃_i = L_i(t)/L_i(0)``,
    ``r_i = L̃_i / mean_j L̃_j``; ``L_grad = Σ_i |G_i − Ḡ·r_i^α|`` with ``Ḡ·r_i^α`` held
    constant. The step's parameters get the gradient of ``Σ_i w_i L_i``; then ``w`` takes one
    Adam step on ``∇_w L_grad`` (its own learning rate ``lr``) and is renormalised so that the
    step's weights sum to the number of tasks in the step. Needs steps with several tasks.

    Args:
        alpha: Asymmetry ``α`` (0.5–1.5 typical; larger pulls slow tasks harder).
        lr: Learning rate of the weights' own Adam update.
        layer: The shared layer ``W``: a module name (``"trunk"``) or a dotted path inside one
            (``"trunk.2"``). ``None``: the last parameterised layer of the last module the step's
            tasks share.

    Example:
        >>> from mtlgraph.balancing import make_balancer
        >>> make_balancer({"name": "gradnorm", "alpha": 1.0}).alpha
        1.0
    """

    name = "gradnorm"

    _BETAS = (0.9, 0.999)
    _EPS = 1e-8
    _MIN_WEIGHT = 1e-3

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, layer: str | None = None) -> None:
        super().__init__()
        problems: list[str] = []
        _check(problems, _is_number(alpha) and alpha >= 0, f"alpha must be >= 0, got {alpha!r}")
        _check(problems, _is_number(lr) and lr > 0, f"lr must be a positive number, got {lr!r}")
        _check(
            problems,
            layer is None or (isinstance(layer, str) and layer != ""),
            f"layer must be a module name or None, got {layer!r}",
        )
        _raise(self.name, problems)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.layer = layer
        self._w: dict[str, float] = {}  # current weights
        self._initial: dict[str, float] = {}  # L_i(0)
        self._adam: dict[str, list[float]] = {}  # task -> [m, v, steps]
        # plan id -> (plan, W): cached per execution plan (so per model and task set)
        self._layers: dict[int, tuple[ExecutionPlan, list[nn.Parameter]]] = {}

    def setup(self, tasks: Mapping[str, Task]) -> None:
        self._layers = {}
        if self.layer is not None:
            self._resolve(tasks)  # fail now, not at the first step

    def _resolve(self, tasks: Mapping[str, Task]) -> list[nn.Parameter]:
        assert self.layer is not None
        head, _, rest = self.layer.partition(".")
        pools = {m: task.module_pool[m] for task in tasks.values() for m in task.module_pool}
        if head not in pools:
            raise ConfigError(
                [
                    f"balancer 'gradnorm': layer '{self.layer}' names no module of the model"
                    f"{did_you_mean(head, pools)}; modules: {quoted(pools)}"
                ]
            )
        try:
            module = pools[head].get_submodule(rest) if rest else pools[head]
        except AttributeError as e:
            raise ConfigError(
                [f"balancer 'gradnorm': layer '{self.layer}': module '{head}' has no '{rest}'"]
            ) from e
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(
                [f"balancer 'gradnorm': layer '{self.layer}' has no trainable parameters"]
            )
        return params

    def _last_shared(self, ctx: StepContext) -> list[nn.Parameter]:
        cached = self._layers.get(id(ctx.plan))
        if cached is not None and cached[0] is ctx.plan:
            return cached[1]
        params = self._resolve(ctx.tasks) if self.layer else _last_shared_layer(ctx.tasks, ctx.plan)
        self._layers[id(ctx.plan)] = (ctx.plan, params)
        return params

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        weighted = _static(losses, ctx)
        names = list(weighted)
        if len(names) == 1:
            self._say_once(
                "single",
                "gradnorm: a step holds only task '%s', so its loss is used as is (GradNorm "
                "needs several tasks per step: use batch_scheduler='mixed' or datasets that "
                "label several tasks). Said once.",
                names[0],
            )
            ctx.backward(weighted[names[0]])
            return
        layer = self._last_shared(ctx)
        if not layer:
            self._say_once(
                "unshared",
                "gradnorm: tasks %s share no trainable layer; their losses are summed",
                list(names),
            )
            _weighted_backward(losses, self._w, ctx)
            return
        norms = []
        for task_name in names:
            grads = torch.autograd.grad(
                ctx.scale(weighted[task_name]), layer, retain_graph=True, allow_unused=True
            )
            sq = [ctx.reduce(g).pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else layer[0].new_zeros(()))
        task_losses = ctx.reduce(torch.stack([weighted[t].detach() for t in names]).float())
        stats = torch.stack([torch.stack(norms).float(), task_losses]).tolist()
        for task_name, loss0 in zip(names, stats[1], strict=True):
            if task_name not in self._initial and math.isfinite(loss0):
                self._initial[task_name] = loss0
        w = [self._w.get(t, 1.0) for t in names]
        _weighted_backward(losses, dict(zip(names, w, strict=True)), ctx)
        if all(math.isfinite(v) for v in stats[0] + stats[1]):
            self._update(names, w, stats[0], stats[1])

    def _update(
        self, names: list[str], w: list[float], norms: list[float], losses: list[float]
    ) -> None:
        """One Adam step of the weights on ∇_w L_grad, then renormalise to Σ w = K."""
        k = len(names)
        g = [wi * ni for wi, ni in zip(w, norms, strict=True)]
        g_mean = sum(g) / k
        rel = [li / max(self._initial[t], 1e-12) for t, li in zip(names, losses, strict=True)]
        rel_mean = sum(rel) / k
        b1, b2 = self._BETAS
        new = []
        for t, wi, gi, ni, ri in zip(names, w, g, norms, rel, strict=True):
            target = g_mean * (ri / max(rel_mean, 1e-12)) ** self.alpha
            grad = math.copysign(ni, gi - target) if gi != target else 0.0
            m, v, n = self._adam.get(t, [0.0, 0.0, 0.0])
            n += 1
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            self._adam[t] = [m, v, n]
            step = self.lr * (m / (1 - b1**n)) / (math.sqrt(v / (1 - b2**n)) + self._EPS)
            new.append(max(wi - step, self._MIN_WEIGHT))
        total = sum(new)
        for t, wi in zip(names, new, strict=True):
            self._w[t] = k * wi / total

    def weights(self) -> dict[str, float]:
        return {t: self._w.get(t, 1.0) for t in self._initial}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "weights": dict(self._w),
            "initial_losses": dict(self._initial),
            "adam": {t: list(s) for t, s in self._adam.items()},
        }

    def set_extra_state(self, state: Any) -> None:
        self._w = {t: float(v) for t, v in state["weights"].items()}
        self._initial = {t: float(v) for t, v in state["initial_losses"].items()}
        self._adam = {t: [float(x) for x in s] for t, s in state["adam"].items()}


class InverseMetricBalancer(Balancer):
    """Weights inversely proportional to each task's latest validation metric.

    After each evaluation, ``w_i ∝ 1/m_i`` for a higher-is-better metric ``m_i`` (``∝ m_i`` for a
    lower-is-better one); ``m_i`` is clipped to at least ``eps`` and the weights are renormalised
    so that the scored tasks' weights sum to their number. Between evaluations the weights are
    constant (1 before the first one). Tasks that do well get less weight, so training focuses
    on the laggards (the sin/cos guide's dynamic weighting).

    Args:
        metric: The metric key per task: one key for every task, a ``{task: key}`` mapping, or
            ``None`` for the default: ``r2`` for regression tasks whose scorer has it (it has no
            unit, so tasks of different scale compare), else the first metric of the task's
            scorer. The direction comes from the metric's ``higher_is_better``.
        split: Which split's scores to use (several datasets of the split are averaged).
        eps: Lower clip of the metric values (keeps ``1/m`` finite and weights away from 0).

    Example:
        >>> from torch import nn
        >>> from mtlgraph import Operation, Task
        >>> from mtlgraph.balancing import InverseMetricBalancer
        >>> tasks = {t: Task(t, {t: nn.Linear(2, 2)}, [Operation(t, [("_input_", "x")])])
        ...          for t in ("a", "b")}
        >>> b = InverseMetricBalancer()  # default metric: each task's first, here accuracy
        >>> b.setup(tasks)
        >>> b.on_evaluation({"a/d/valid/accuracy": 0.9, "b/d/valid/accuracy": 0.6})
        >>> {t: round(w, 3) for t, w in b.weights().items()}  # ∝ 1/0.9 and 1/0.6, sum 2
        {'a': 0.8, 'b': 1.2}
    """

    name = "inverse_metric"

    def __init__(
        self, metric: str | Mapping[str, str] | None = None, split: str = "valid", eps: float = 0.01
    ) -> None:
        super().__init__()
        problems: list[str] = []
        _check(
            problems,
            metric is None or isinstance(metric, (str, Mapping)),
            f"metric must be a metric key, a {{task: key}} mapping or None, got {metric!r}",
        )
        _check(problems, isinstance(split, str) and split != "", f"bad split {split!r}")
        _check(problems, _is_number(eps) and eps > 0, f"eps must be > 0, got {eps!r}")
        _raise(self.name, problems)
        self.metric = metric
        self.split = split
        self.eps = float(eps)
        self._metric: dict[str, str] = {}  # task -> metric key
        self._higher: dict[str, bool] = {}  # task -> higher_is_better
        self._weights: dict[str, float] = {}

    def setup(self, tasks: Mapping[str, Task]) -> None:
        problems = []
        if isinstance(self.metric, Mapping):
            problems += [
                f"balancer 'inverse_metric': metric names unknown task '{t}'"
                f"{did_you_mean(str(t), tasks)}; the model has {quoted(tasks)}"
                for t in self.metric
                if t not in tasks
            ]
        for task_name, task in tasks.items():
            keys = task.scorer.metric_keys
            if isinstance(self.metric, str):
                key = self.metric
            elif isinstance(self.metric, Mapping) and task_name in self.metric:
                key = self.metric[task_name]
            elif task.task_type == "regression" and "r2" in keys:
                key = "r2"
            elif keys:
                key = keys[0]
            else:
                continue  # a task without metrics keeps weight 1
            if key not in keys:
                problems.append(
                    f"balancer 'inverse_metric': task '{task_name}' has no metric '{key}'"
                    f"{did_you_mean(key, keys)}; its scorer reports {quoted(keys) or 'nothing'}"
                )
                continue
            self._metric[task_name] = key
            self._higher[task_name] = task.scorer.higher_is_better(key)
        if problems:
            raise ConfigError(problems, header="invalid balancer 'inverse_metric':")

    def on_evaluation(self, scores: Mapping[str, float]) -> None:
        values: dict[str, list[float]] = {}
        for key, value in scores.items():
            try:
                task_name, _, split, metric = split_key(key)
            except ValueError:
                continue
            if (
                split == self.split
                and self._metric.get(task_name) == metric
                and math.isfinite(value)
            ):
                values.setdefault(task_name, []).append(float(value))
        if not values:
            self._say_once(
                "no_scores",
                "inverse_metric: no finite '%s' scores of the tasks' metrics %s; weights unchanged",
                self.split,
                self._metric,
            )
            return
        raw = {}
        for task_name, vs in values.items():
            m = max(sum(vs) / len(vs), self.eps)
            raw[task_name] = 1.0 / m if self._higher[task_name] else m
        norm = sum(raw.values())
        self._weights.update({t: len(raw) * r / norm for t, r in raw.items()})

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        _weighted_backward(losses, self._weights, ctx)

    def weights(self) -> dict[str, float]:
        return {t: self._weights.get(t, 1.0) for t in self._metric}

    def get_extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self._weights)}

    def set_extra_state(self, state: Any) -> None:
        self._weights = {t: float(w) for t, w in state["weights"].items()}


class RLWBalancer(_LastWeights):
    """Random loss weighting (Lin et al., 2021): ``w = K·softmax(z)``, ``z ~ N(0, I)`` each step.

    A cheap baseline that is surprisingly hard to beat; draws from its own seeded generator.

    Args:
        seed: Seed of the balancer's ``torch.Generator``.

    Example:
        >>> from mtlgraph.balancing import make_balancer
        >>> make_balancer({"name": "rlw", "seed": 3}).seed
        3
    """

    name = "rlw"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._gen = _seeded_generator("rlw", seed)

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        k = len(losses)
        w = (
            k * torch.softmax(torch.randn(k, generator=self._gen, dtype=torch.float64), 0)
        ).tolist()
        self._last.update(zip(losses, w, strict=True))
        _weighted_backward(losses, dict(zip(losses, w, strict=True)), ctx)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self._gen.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._gen.set_state(state["generator"])


# ====================================================================== gradient-based


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


def _shared_modules(plan: ExecutionPlan) -> list[str]:
    """Modules used by more than one of the plan's tasks, in execution order."""
    users: dict[str, int] = {}
    for modules in plan.task_modules.values():
        for m in modules:
            users[m] = users.get(m, 0) + 1
    return [m for m in plan.module_names if users[m] > 1]


def _module(tasks: Mapping[str, Task], plan: ExecutionPlan, module_name: str) -> nn.Module:
    for task_name, modules in plan.task_modules.items():
        if module_name in modules:
            return tasks[task_name].module_pool[module_name]
    raise KeyError(module_name)  # pragma: no cover - callers pass names from the plan


def _last_shared_layer(tasks: Mapping[str, Task], plan: ExecutionPlan) -> list[nn.Parameter]:
    """Trainable parameters of the last parameterised layer of the last shared module."""
    shared = set(_shared_modules(plan))
    first_task = plan.task_names[0]
    for module_name in reversed(plan.task_modules[first_task]):
        if module_name not in shared:
            continue
        layers = [
            m
            for m in _module(tasks, plan, module_name).modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if layers:
            return [p for p in layers[-1].parameters(recurse=False) if p.requires_grad]
    return []


def _accumulate(p: nn.Parameter, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


class SharedGradients:
    """One gradient per task on the shared parameters of a step, in a preallocated buffer.

    Used by the gradient-based balancers and by :mod:`mtlgraph.diagnostics`. Layouts (which
    parameters are shared, their place in the buffer) are cached per execution plan, so per
    model and task set; :meth:`clear` forgets them (after freezing changed what is trainable).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> from mtlgraph.balancing import SharedGradients
        >>> trunk = nn.Linear(2, 1, bias=False)
        >>> ops = lambda t: [Operation("trunk", [("_input_", "x")]), Operation(t, ["trunk"])]
        >>> tasks = [Task(t, {"trunk": trunk, t: nn.Linear(1, 2)}, ops(t)) for t in ("a", "b")]
        >>> model = MultitaskClassifier(tasks)
        >>> layout = SharedGradients().layout(model.tasks, model.plan(["a", "b"]))
        >>> layout.modules, layout.size
        ([('trunk', 0, 2)], 2)
    """

    def __init__(self) -> None:
        # plan id -> (plan, layout); the plan is kept so that a recycled id cannot match
        self._layouts: dict[int, tuple[ExecutionPlan, SharedLayout]] = {}

    def clear(self) -> None:
        """Forget the cached layouts."""
        self._layouts = {}

    def layout(self, tasks: Mapping[str, Task], plan: ExecutionPlan) -> SharedLayout:
        """The (cached) :class:`SharedLayout` of ``plan``."""
        cached = self._layouts.get(id(plan))
        if cached is not None and cached[0] is plan:
            return cached[1]
        shared_names = _shared_modules(plan)
        seen: set[int] = set()
        shared: list[nn.Parameter] = []
        modules: list[tuple[str, int, int]] = []
        offset = 0
        for m in shared_names:
            start = offset
            for p in _module(tasks, plan, m).parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    shared.append(p)
                    offset += p.numel()
            if offset > start:
                modules.append((m, start, offset))
        own: dict[str, list[nn.Parameter]] = {}
        for task_name, task_modules in plan.task_modules.items():
            mine: list[nn.Parameter] = []
            for m in task_modules:
                if m in shared_names:
                    continue
                for p in _module(tasks, plan, m).parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        mine.append(p)
            own[task_name] = mine
        slices = []
        offset = 0
        for p in shared:
            slices.append((offset, p.numel()))
            offset += p.numel()
        dtype = shared[0].dtype if shared else torch.float32
        device = shared[0].device if shared else torch.device("cpu")
        buffer = torch.empty(len(plan.task_names), offset, dtype=dtype, device=device)
        layout = SharedLayout(plan.task_names, shared, slices, modules, own, buffer, offset)
        self._layouts[id(plan)] = (plan, layout)
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
                _accumulate(p, g if reduce is None else reduce(g))
        rows = buffer[: len(names)]
        if reduce is not None:
            reduce(rows)
        return rows


class GradientBalancer(_LastWeights):
    """Base of methods that combine per-task gradients of the shared parameters.

    For the step's tasks ``i = 1..K`` it computes ``g_i = ∇_{θ_s} (w_i L_i)`` on the shared
    parameters ``θ_s`` (those of modules used by more than one task of the step), flattened into
    one preallocated ``(K, P)`` buffer, and asks :meth:`combine` for coefficients ``β`` given the
    Gram matrix ``M_ij = g_i·g_j``; the shared parameters get ``d = Σ_i β_i g_i``. Parameters
    only one task uses get that task's own gradient. A one-task step uses the plain gradient (and
    says so once in the log). Cost: one backward pass per task through its path.

    Subclasses implement :meth:`combine`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._grads = SharedGradients()

    def combine(self, gram: np.ndarray) -> np.ndarray:
        """Coefficients ``β`` (shape ``(K,)``, float64) of the update ``d = Σ_i β_i g_i``."""
        raise NotImplementedError

    def setup(self, tasks: Mapping[str, Task]) -> None:
        self._grads.clear()  # freezing may have changed which parameters are trainable

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        weighted = _static(losses, ctx)
        names = list(weighted)
        if len(names) == 1:
            self._say_once(
                "single",
                "%s: a step holds only task '%s', so its plain gradient is used (gradient "
                "methods need several tasks per step: use batch_scheduler='mixed' or datasets "
                "that label several tasks). Said once.",
                self.name,
                names[0],
            )
            ctx.backward(weighted[names[0]])
            self._last[names[0]] = 1.0
            return
        layout = self._grads.layout(ctx.tasks, ctx.plan)
        if layout.size == 0:
            self._say_once(
                "unshared",
                "%s: tasks %s share no trainable parameter; each gets its own gradient",
                self.name,
                names,
            )
            _weighted_backward(losses, {}, ctx)
            return
        buffer = self._grads.compute(
            layout, weighted, ctx.scale, accumulate_own=True, reduce=ctx.reduce
        )
        gram = (buffer @ buffer.T).double().cpu().numpy()
        if np.isfinite(gram).all():
            beta = np.asarray(self.combine(gram), dtype=np.float64)
        else:  # overflow under fp16 loss scaling: the grad scaler will skip this step
            beta = np.ones(len(names))
        direction = torch.from_numpy(beta).to(buffer) @ buffer
        for p, (offset, n) in zip(layout.shared, layout.slices, strict=True):
            _accumulate(p, direction[offset : offset + n].view_as(p))
        self._last.update(zip(names, beta.tolist(), strict=True))

    def weights(self) -> dict[str, float]:
        """The last step's coefficients ``β_i`` of each task's shared gradient."""
        return dict(self._last)


class PCGradBalancer(GradientBalancer):
    """PCGrad, gradient surgery (Yu et al., NeurIPS 2020).

    For each task ``i``: ``g_i' = g_i``; for the other tasks ``j`` in random order, if
    ``g_i'·g_j < 0`` then ``g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²)·g_j`` (project away the conflicting
    component). The update is ``d = Σ_i g_i'``. The order is drawn from the balancer's own
    seeded ``torch.Generator``.

    Args:
        seed: Seed of the shuffling generator.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import PCGradBalancer
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> PCGradBalancer().combine(g @ g.T) @ g  # (0.5, 0.5) + (0, 1)
        array([0.5, 1.5])
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._gen = _seeded_generator("pcgrad", seed)

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        total = np.zeros(k)
        for i in range(k):
            c = np.zeros(k)  # g_i' = Σ_k c_k g_k
            c[i] = 1.0
            for j in torch.randperm(k, generator=self._gen).tolist():
                if j == i or gram[j, j] <= 0:
                    continue
                dot = float(c @ gram[:, j])
                if dot < 0:
                    c[j] -= dot / gram[j, j]
            total += c
        return total

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self._gen.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._gen.set_state(state["generator"])


def _min_norm(gram: np.ndarray, max_iter: int = 250, tol: float = 1e-10) -> np.ndarray:
    """``argmin_{α ∈ simplex} ‖Σ α_i g_i‖²`` from the Gram matrix.

    K = 2: the closed form ``α_1 = clip(((g_2 − g_1)·g_2)/‖g_1 − g_2‖², 0, 1)``. K > 2:
    Frank–Wolfe (Sener & Koltun 2018) in its pairwise form, which moves weight from the worst
    vertex in the support to the best one with an exact line search, and converges linearly
    where the plain form zig-zags; it starts from the uniform point.
    """
    k = len(gram)
    if k == 1:
        return np.ones(1)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        a = 0.5 if denom <= 0 else float(np.clip((gram[1, 1] - gram[0, 1]) / denom, 0.0, 1.0))
        return np.array([a, 1.0 - a])
    alpha = np.full(k, 1.0 / k)
    floor = tol * max(float(np.max(np.diag(gram))), 1e-300)
    for _ in range(max_iter):
        grad = gram @ alpha  # half the gradient of αᵀMα
        t = int(np.argmin(grad))
        support = np.flatnonzero(alpha > 0)
        s = int(support[np.argmax(grad[support])])
        gap = float(grad[s] - grad[t])  # the pairwise duality gap
        if gap <= max(tol * float(alpha @ grad), floor):
            break
        denom = float(gram[t, t] + gram[s, s] - 2 * gram[t, s])
        gamma = float(alpha[s]) if denom <= 0 else min(gap / denom, float(alpha[s]))
        alpha[t] += gamma
        alpha[s] -= gamma
        if alpha[s] < 1e-15:
            alpha[s] = 0.0
    return alpha


class MGDABalancer(GradientBalancer):
    """MGDA, the multiple-gradient descent min-norm solver (Sener & Koltun, NeurIPS 2018).

    ``α = argmin_{α ∈ simplex} ‖Σ_i α_i g_i‖²`` (pairwise Frank–Wolfe; closed form for two
    tasks) and
    ``d = K·Σ_i α_i g_i`` (scaled by ``K`` when ``rescale``, so its size compares with a sum of
    gradients). To first order, a step along ``−d`` lowers every task's loss (``g_i·d ≥ 0``).

    Args:
        rescale: Multiply the direction by the number of tasks in the step.
        max_iter: Frank–Wolfe iterations (more than two tasks).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import MGDABalancer
        >>> g = np.array([[2.0, 0.0], [0.0, 1.0]])
        >>> MGDABalancer(rescale=False).combine(g @ g.T)  # α_1 = (1 − 0)/(4 + 1)
        array([0.2, 0.8])
    """

    name = "mgda"

    def __init__(self, rescale: bool = True, max_iter: int = 250) -> None:
        super().__init__()
        problems: list[str] = []
        _check(problems, isinstance(rescale, bool), f"rescale must be true or false: {rescale!r}")
        _check(
            problems,
            isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter > 0,
            f"max_iter must be a positive integer, got {max_iter!r}",
        )
        _raise(self.name, problems)
        self.rescale = rescale
        self.max_iter = max_iter

    def combine(self, gram: np.ndarray) -> np.ndarray:
        alpha = _min_norm(gram, self.max_iter)
        return alpha * len(gram) if self.rescale else alpha


def _line_min(
    a: float, b: float, s: float, q2: float, q1: float, q0: float, hi: float
) -> tuple[float, float]:
    """Minimise ``f(γ) = a + b·γ + s·√(q2·γ² + q1·γ + q0)`` over ``γ ∈ [0, hi]`` exactly.

    ``f`` is convex (``s ≥ 0``, the quadratic is a squared norm), so the minimum is at an end or
    at a root of ``f'``: ``2b·√q = −s·(2·q2·γ + q1)``, squared into a quadratic in ``γ``.
    """

    def f(g: float) -> float:
        return a + b * g + s * math.sqrt(max(q2 * g * g + q1 * g + q0, 0.0))

    candidates = [0.0, hi]
    c2 = 4 * b * b * q2 - s * s * 4 * q2 * q2
    c1 = 4 * b * b * q1 - s * s * 4 * q2 * q1
    c0 = 4 * b * b * q0 - s * s * q1 * q1
    if abs(c2) > 1e-300:
        disc = c1 * c1 - 4 * c2 * c0
        if disc >= 0:
            r = math.sqrt(disc)
            candidates += [(-c1 + r) / (2 * c2), (-c1 - r) / (2 * c2)]
    elif abs(c1) > 1e-300:
        candidates.append(-c0 / c1)
    best = min((g for g in candidates if 0.0 <= g <= hi), key=f)
    return best, f(best)


class CAGradBalancer(GradientBalancer):
    """CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021).

    ``g_0 = mean_i g_i``, ``φ = c²‖g_0‖²``; ``w ∈ simplex`` minimises
    ``g_w·g_0 + √φ·‖g_w‖`` with ``g_w = Σ_i w_i g_i`` (pairwise Frank–Wolfe with exact line
    search on the Gram matrix); ``d = g_0 + (√φ/‖g_w‖)·g_w``, divided by ``1 + c²`` when
    ``rescale``. ``c = 0`` is plain averaging; larger ``c`` trades average progress for the
    worst task's progress.

    Args:
        c: Conflict-aversion radius, in ``[0, 1)``.
        rescale: Divide the direction by ``1 + c²``.
        max_iter: Solver iterations.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import CAGradBalancer
        >>> g = np.array([[1.0, 0.0], [-0.5, 1.0]])
        >>> CAGradBalancer(c=0.0).combine(g @ g.T)  # the mean
        array([0.5, 0.5])
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: bool = True, max_iter: int = 100) -> None:
        super().__init__()
        problems: list[str] = []
        _check(problems, _is_number(c) and 0 <= c < 1, f"c must be in [0, 1), got {c!r}")
        _check(problems, isinstance(rescale, bool), f"rescale must be true or false: {rescale!r}")
        _check(
            problems,
            isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter > 0,
            f"max_iter must be a positive integer, got {max_iter!r}",
        )
        _raise(self.name, problems)
        self.c = float(c)
        self.rescale = rescale
        self.max_iter = max_iter

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        mean = np.full(k, 1.0 / k)
        sqrt_phi = self.c * math.sqrt(max(float(mean @ gram @ mean), 0.0))
        if sqrt_phi == 0.0:
            return mean
        w = self.solve(gram, sqrt_phi)
        gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        if gw_norm <= 1e-12 * math.sqrt(float(np.max(np.diag(gram)))):
            return mean  # g_w = 0: the tasks cancel exactly and g_0 is ~0 too
        beta = mean + (sqrt_phi / gw_norm) * w
        return beta / (1 + self.c**2) if self.rescale else beta

    def solve(self, gram: np.ndarray, sqrt_phi: float) -> np.ndarray:
        """``argmin_{w ∈ simplex} w·M·𝟙/K + √φ·√(wᵀMw)`` by pairwise Frank–Wolfe."""
        k = len(gram)
        lin = gram.mean(axis=1)  # g_i·g_0
        w = np.full(k, 1.0 / k)
        for _ in range(self.max_iter):
            mw = gram @ w
            norm = math.sqrt(max(float(w @ mw), 1e-30))
            grad = lin + sqrt_phi * mw / norm
            t = int(np.argmin(grad))  # toward vertex t ...
            support = np.flatnonzero(w > 0)
            s = int(support[np.argmax(grad[support])])  # ... away from vertex s
            gap = float(grad[s] - grad[t])
            if t == s or gap <= 1e-12 * (abs(float(grad @ w)) + 1e-30):
                break
            hi = float(w[s])
            # Along w + γ(e_t − e_s): linear part and the squared norm as quadratics in γ.
            d_lin = float(lin[t] - lin[s])
            q0 = float(w @ mw)
            q1 = 2 * float(mw[t] - mw[s])
            q2 = float(gram[t, t] + gram[s, s] - 2 * gram[t, s])
            gamma, _ = _line_min(float(lin @ w), d_lin, sqrt_phi, q2, q1, q0, hi)
            if gamma <= 0:
                break
            w[t] += gamma
            w[s] -= gamma
            if w[s] < 1e-15:
                w[s] = 0.0
        return w


# ====================================================================== registry

_REGISTRY: dict[str, type[Balancer]] = {
    "sum": SumBalancer,
    "uncertainty": UncertaintyBalancer,
    "dwa": DWABalancer,
    "gradnorm": GradNormBalancer,
    "inverse_metric": InverseMetricBalancer,
    "rlw": RLWBalancer,
    "pcgrad": PCGradBalancer,
    "cagrad": CAGradBalancer,
    "mgda": MGDABalancer,
}


def register_balancer(name: str, cls: type[Balancer]) -> None:
    """Register a balancer class under ``name`` (usable as ``Trainer(balancer=name)``).

    Example:
        >>> from mtlgraph.balancing import SumBalancer, register_balancer, make_balancer
        >>> class Halved(SumBalancer):
        ...     def backward(self, losses, ctx):
        ...         super().backward({t: 0.5 * v for t, v in losses.items()}, ctx)
        >>> register_balancer("halved_doc", Halved)
        >>> type(make_balancer("halved_doc")).__name__
        'Halved'
    """
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise ConfigError([f"balancer '{name}' must be a Balancer subclass"])
    if name in _REGISTRY:
        raise ConfigError([f"balancer '{name}' is already registered"])
    _REGISTRY[name] = cls


def balancer_names() -> list[str]:
    """Registered balancer names."""
    return sorted(_REGISTRY)


def make_balancer(spec: str | Mapping[str, Any] | Balancer) -> Balancer:
    """Build a balancer from a name, ``{"name": ..., **kwargs}``, or return an instance.

    Raises:
        ConfigError: Unknown names (with a suggestion), unknown arguments (naming the ones the
            balancer takes) or bad values.
    """
    if isinstance(spec, Balancer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
    else:
        raise ConfigError(
            [f"balancer must be a name, a {{'name': ...}} mapping or a Balancer, got {spec!r}"]
        )
    if name not in _REGISTRY:
        raise ConfigError(
            [
                f"unknown balancer {name!r}{did_you_mean(str(name), _REGISTRY)}; "
                f"known: {quoted(_REGISTRY)}"
            ]
        )
    cls = _REGISTRY[name]
    accepted = _init_params(cls)
    unknown = [k for k in kwargs if accepted is not None and k not in accepted]
    if unknown:
        raise ConfigError(
            [
                f"balancer '{name}' takes no argument '{k}'{did_you_mean(k, accepted or [])}; "
                f"it takes {quoted(accepted or []) or 'none'}"
                for k in unknown
            ]
        )
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError([f"balancer '{name}': {e}"]) from e


def _init_params(cls: type[Balancer]) -> list[str] | None:
    """Keyword arguments ``cls`` accepts, or ``None`` when it takes ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
