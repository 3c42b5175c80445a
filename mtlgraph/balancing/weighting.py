"""Loss-weighting balancers (``sum``, ``uncertainty``, ``dwa``, ``gradnorm``, ``inverse_metric``,
``rlw``, ``stch``, ``go4align``): one backward pass of a weighted sum of the step's losses.
Formulas: ``docs/balancing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.balancing.base import (
    Balancer,
    LastWeights,
    Seeded,
    StepContext,
    grown,
    require_non_negative,
    saved_task_order,
)
from mtlgraph.balancing.solvers import adam_step, kmeans_1d
from mtlgraph.exceptions import ArgumentCheck, ConfigError
from mtlgraph.gradients import PlanCache, last_shared_layer
from mtlgraph.graph.task import Task
from mtlgraph.metrics import split_scores


class SumBalancer(LastWeights):
    """``L = Σ_i w_i · L_i`` with ``w_i = Task.weight`` (1 by default).

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build("sum").name
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
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): a learned
    ``s_i = log σ_i²`` per task, Gaussian form for regression tasks, softmax form for the others;
    the logged weight is ``exp(−s_i)``. Formulas: ``docs/balancing.md``.

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
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("init", init)
        check.number("lr", lr, "> 0", lambda v: v > 0, optional=True)
        for task_name, form in (forms or {}).items():
            check.choice(f"forms['{task_name}']", form, ("regression", "classification"))
        check.done()
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
        vector = grown(self.log_vars, self._index, tasks, self.init)
        if vector is not self.log_vars:
            self.log_vars, self._rows = vector, {}
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
        order = saved_task_order(self.name, self._index, state["tasks"])
        self._half = dict(zip(order, state["regression_form"], strict=True))


class DWABalancer(Balancer):
    """Dynamic weight average (Liu, Johns & Davison, CVPR 2019): ``K·softmax(r/T)`` of each task's
    last two epoch-mean loss ratios ``r_k``; 1 until a task has two epochs of history.

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
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("temperature", temperature, "> 0", lambda v: v > 0)
        check.done()
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
        ctx.weighted_backward(losses, self._weights)

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
    """GradNorm (Chen et al., ICML 2018): trainable weights (own Adam step) that equalise the
    tasks' gradient norms on the last shared layer and their learning pace; needs steps with
    several tasks. Formulas: ``docs/balancing.md``.

    Args:
        alpha: Asymmetry ``α`` (0.5–1.5 typical; larger pulls slow tasks harder).
        lr: Learning rate of the weights' own Adam update.
        layer: The shared layer ``W``: a module name (``"trunk"``) or a dotted path inside one
            (``"trunk.2"``). ``None``: the last parameterised layer of the last module the step's
            tasks share.

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build({"name": "gradnorm", "alpha": 1.0}).alpha
        1.0
    """

    name = "gradnorm"

    _MIN_WEIGHT = 1e-3

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, layer: str | None = None) -> None:
        super().__init__()
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("alpha", alpha, ">= 0", lambda v: v >= 0)
        check.number("lr", lr, "> 0", lambda v: v > 0)
        check.require(
            layer is None or (isinstance(layer, str) and layer != ""),
            f"layer must be a module name or None, got {layer!r}",
        )
        check.done()
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.layer = layer
        self._w: dict[str, float] = {}  # current weights
        self._initial: dict[str, float] = {}  # L_i(0)
        self._adam: dict[str, list[float]] = {}  # task -> [m, v, steps]
        # W per execution plan (so per model and task set; a new plan after add_task or
        # remove_task never reuses an old plan's entry)
        self._layers = PlanCache[list[nn.Parameter]]()

    def setup(self, tasks: Mapping[str, Task]) -> None:
        self._layers.clear()
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
        tasks = ctx.tasks
        if self.layer:
            return self._layers.get(ctx.plan, lambda plan: self._resolve(tasks))
        return self._layers.get(ctx.plan, lambda plan: last_shared_layer(tasks, plan))

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        weighted = ctx.weighted(losses)
        names = list(weighted)
        if self._backward_single_task(weighted, ctx):
            return
        layer = self._last_shared(ctx)
        if not layer:
            self._say_once(
                "unshared",
                "gradnorm: tasks %s share no trainable layer; their losses are summed",
                list(names),
            )
            ctx.weighted_backward(losses, self._w)
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
        ctx.weighted_backward(losses, dict(zip(names, w, strict=True)))
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
        new = []
        for t, wi, gi, ni, ri in zip(names, w, g, norms, rel, strict=True):
            target = g_mean * (ri / max(rel_mean, 1e-12)) ** self.alpha
            grad = math.copysign(ni, gi - target) if gi != target else 0.0
            new.append(max(wi - adam_step(self._adam, t, grad, self.lr), self._MIN_WEIGHT))
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
    """Weights ``∝ 1/m_i`` (``∝ m_i`` if lower is better) of each task's latest validation
    metric, renormalised to sum to the scored tasks' number; 1 before the first evaluation.

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
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.require(
            metric is None or isinstance(metric, (str, Mapping)),
            f"metric must be a metric key, a {{task: key}} mapping or None, got {metric!r}",
        )
        check.require(isinstance(split, str) and split != "", f"bad split {split!r}")
        check.number("eps", eps, "> 0", lambda v: v > 0)
        check.done()
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
        for task_name, _, split, metric, value in split_scores(scores):
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
        ctx.weighted_backward(losses, self._weights)

    def weights(self) -> dict[str, float]:
        return {t: self._weights.get(t, 1.0) for t in self._metric}

    def get_extra_state(self) -> dict[str, Any]:
        return {"weights": dict(self._weights)}

    def set_extra_state(self, state: Any) -> None:
        self._weights = {t: float(w) for t, w in state["weights"].items()}


class RLWBalancer(Seeded):
    """Random loss weighting (Lin et al., 2021): ``w = K·softmax(z)``, ``z ~ N(0, I)`` each step,
    drawn from its own seeded generator.

    Args:
        seed: Seed of the balancer's ``torch.Generator``.

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build({"name": "rlw", "seed": 3}).seed
        3
    """

    name = "rlw"

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        k = len(losses)
        w = (
            k * torch.softmax(torch.randn(k, generator=self._gen, dtype=torch.float64), 0)
        ).tolist()
        self._last.update(zip(losses, w, strict=True))
        ctx.weighted_backward(losses, dict(zip(losses, w, strict=True)))


class STCHBalancer(LastWeights):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024): after ``warmup_epochs`` of
    training on ``Σ_i log L_i``, the objective ``K·μ·log Σ_i exp(λ_i·log(L_i/n_i)/μ)``, a smooth
    maximum of the log-losses normalised by their nadir ``n_i`` (the mean loss of the last
    warm-up epoch); ``λ_i`` is ``Task.weight``. One backward pass of ``Σ_i w_i·L_i``.

    Args:
        mu: ``μ``, the smoothing (→ 0: the worst task only; large: the sum of the log-losses).
        warmup_epochs: Epochs of plain log-loss training whose last one gives the nadir (LibMTL's
            ``STCH_warmup_epoch = 4`` counts from 0: five epochs).
        eps: Added to the losses before the log.

    Example:
        >>> from mtlgraph.balancing import STCHBalancer
        >>> b = STCHBalancer(mu=1.0)
        >>> b._nadir = {"a": 1.0, "b": 1.0}
        >>> w = b._stch_weights(["a", "b"], [2.0, 0.5], [1.0, 1.0])  # 2·softmax(log L)_i/L_i
        >>> [round(x, 6) for x in w]  # p = (2, 0.5)/2.5: w = 2·(0.8/2, 0.2/0.5)
        [0.8, 0.8]
    """

    name = "stch"

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 5, eps: float = 1e-8) -> None:
        super().__init__()
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("mu", mu, "> 0", lambda v: v > 0)
        check.integer("warmup_epochs", warmup_epochs, least=0)
        check.number("eps", eps, "> 0", lambda v: v > 0)
        check.done()
        self.mu, self.warmup_epochs, self.eps = float(mu), warmup_epochs, float(eps)
        self._epochs = 0  # epochs finished
        self._sums: dict[str, list[float]] = {}  # this warm-up epoch: task -> [Σ L, steps]
        self._nadir: dict[str, float] = {}

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        names = list(losses)
        stacked = torch.stack([losses[t].detach().double() for t in names])
        values = ctx.reduce(stacked).tolist()  # every rank weighs with the same numbers
        require_non_negative(self.name, names, values)
        if not all(math.isfinite(v) for v in values):  # fp16 overflow: the step is skipped
            ctx.weighted_backward(losses, {t: self._last.get(t, 1.0) for t in names})
            return
        if self._epochs < self.warmup_epochs:  # the gradient of Σ_i λ_i·log(L_i + ε)
            for t, v in zip(names, values, strict=True):
                total = self._sums.setdefault(t, [0.0, 0.0])
                total[0] += v
                total[1] += 1
            w = [1.0 / (v + self.eps) for v in values]
        else:
            lam = [ctx.tasks[t].weight for t in names]
            w = self._stch_weights(names, values, lam)
        self._last.update(zip(names, w, strict=True))
        ctx.weighted_backward(losses, dict(zip(names, w, strict=True)))

    def _stch_weights(self, names: list[str], values: list[float], lam: list[float]) -> list[float]:
        """``w_i = K·p_i/(L_i + ε)`` with ``p = softmax(λ_i·log((L_i + ε)/(n_i + ε))/μ)``: the
        gradient of the smooth maximum with respect to ``λ_i·L_i`` (``weighted_backward``
        applies ``λ_i``)."""
        for t, v in zip(names, values, strict=True):
            if t not in self._nadir:
                if self.warmup_epochs > 0:
                    self._say_once(
                        f"nadir|{t}",
                        "stch: task '%s' had no loss in the warm-up epochs; its nadir is its "
                        "first loss after them, %g",
                        t,
                        v,
                    )
                self._nadir[t] = v
        s = [
            li * math.log((v + self.eps) / (self._nadir[t] + self.eps)) / self.mu
            for t, v, li in zip(names, values, lam, strict=True)
        ]
        top = max(s)
        e = [math.exp(x - top) for x in s]
        k, norm = len(names), sum(e)
        return [k * ei / norm / (v + self.eps) for ei, v in zip(e, values, strict=True)]

    def on_epoch_end(self, epoch: int, mean_losses: Mapping[str, float]) -> None:
        self._epochs += 1
        # each task's nadir: its mean loss over the last warm-up epoch that held it
        self._nadir.update({t: total / n for t, (total, n) in self._sums.items()})
        self._sums = {}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "epochs": self._epochs,
            "sums": {t: list(v) for t, v in self._sums.items()},
            "nadir": dict(self._nadir),
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._epochs = int(state["epochs"])
        self._sums = {t: [float(x) for x in v] for t, v in state["sums"].items()}
        self._nadir = {t: float(v) for t, v in state["nadir"].items()}


class GO4AlignBalancer(LastWeights):
    """GO4Align, group optimisation for multi-task alignment (Shen et al., NeurIPS 2024): each
    task's risk-guided indicator ``(Σ_j L_j/L_i)·p_i`` (``p`` an exponentiated-gradient average
    of the risks) is replaced by the mean over its group, the tasks grouped by k-means on the
    indicators; one backward pass of ``Σ_i w_i·L_i``.

    Args:
        num_groups: The number of groups (at most the number of tasks in a step; 1: every task
            gets the mean indicator).
        robust_step_size: ``η ≥ 0``, the step of ``p_i ∝ p_i·exp(−η·L_i)``.
        eps: Added to the losses in ``Σ_j L_j/L_i``.

    Example:
        >>> from mtlgraph.balancing import GO4AlignBalancer
        >>> b = GO4AlignBalancer(num_groups=2, robust_step_size=0.0)
        >>> w = b._group_weights(["a", "b", "c"], [1.0, 2.0, 4.0])  # indicators 7/3, 7/6, 7/12
        >>> [round(x, 4) for x in w]  # groups {a} and {b, c}: (7/6 + 7/12)/2 = 7/8
        [2.3333, 0.875, 0.875]
    """

    name = "go4align"

    def __init__(
        self, num_groups: int = 2, robust_step_size: float = 1e-4, eps: float = 1e-8
    ) -> None:
        super().__init__()
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.integer("num_groups", num_groups)
        check.number("robust_step_size", robust_step_size, ">= 0", lambda v: v >= 0)
        check.number("eps", eps, "> 0", lambda v: v > 0)
        check.done()
        self.num_groups, self.robust_step_size, self.eps = num_groups, float(robust_step_size), eps
        self._logits: dict[str, float] = {}  # log p_i, up to a constant: −η·Σ_t L_i(t)

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        names = list(losses)
        stacked = torch.stack([losses[t].detach().double() for t in names])
        values = ctx.reduce(stacked).tolist()  # every rank weighs with the same numbers
        require_non_negative(self.name, names, values, "divides by")
        if all(math.isfinite(v) for v in values):  # else fp16 overflow: the step is skipped
            self._last.update(zip(names, self._group_weights(names, values), strict=True))
        ctx.weighted_backward(losses, {t: self._last.get(t, 1.0) for t in names})

    def _group_weights(self, names: list[str], values: list[float]) -> list[float]:
        """Update the ``p`` of the step's tasks; their indicators averaged over the groups."""
        for t, v in zip(names, values, strict=True):
            self._logits[t] = self._logits.get(t, 0.0) - self.robust_step_size * v
        logits = np.array([self._logits[t] for t in names])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        total = sum(values)
        indicator = np.array([total / (v + self.eps) for v in values]) * p
        labels = kmeans_1d(indicator, self.num_groups)
        means = {k: float(indicator[labels == k].mean()) for k in set(labels.tolist())}
        return [means[k] for k in labels.tolist()]

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "logits": dict(self._logits)}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._logits = {t: float(v) for t, v in state["logits"].items()}
