"""Recent balancers: ``imtl``, ``aligned_mtl``, ``upgrad``, ``nash_mtl``, ``fairgrad``,
``gradvac``, ``db_mtl``, ``moco``, ``sdmgrad``, ``excess_mtl`` (gradient-based, on
:class:`~mtlgraph.balancing.gradient.GradientBalancer`) and ``famo`` (loss-based, one backward
pass). Their solvers on the Gram matrix are in
:mod:`mtlgraph.balancing.solvers`; the formulas, with the papers, in ``docs/balancing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph.balancing.base import (
    LastWeights,
    Seeded,
    StepContext,
    grown,
    require_non_negative,
    saved_task_order,
)
from mtlgraph.balancing.gradient import GradientBalancer, check_gradients
from mtlgraph.balancing.solvers import (
    adam_step,
    aligned_mtl,
    fairgrad,
    gradvac_coefficients,
    imtl_g,
    nash_mtl,
    project_simplex,
    sdmgrad_weights,
    upgrad,
)
from mtlgraph.exceptions import ArgumentCheck
from mtlgraph.gradients import SharedLayout
from mtlgraph.graph.task import Task

MODULE_GROUPS = "splits the shared parameters' gradient rows by module"


class IMTLBalancer(GradientBalancer):
    """IMTL, impartial multi-task learning (Liu et al., ICLR 2021): an update with the same
    projection on every task's unit gradient (IMTL-G); with ``loss_scaling``, learned loss scales
    ``e^{s_i}·L_i − s_i`` too (IMTL-L). Formulas: ``docs/balancing.md``.

    Args:
        loss_scaling: Learn the IMTL-L scales ``s_i`` too.
        lr: Learning rate of the ``s_i`` (``None``: the Trainer's ``lr``).
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import IMTLBalancer
        >>> g = np.array([[2.0, 0.0], [0.0, 1.0]])
        >>> IMTLBalancer().combine(g @ g.T) @ g  # projection 2/3 on both unit gradients
        array([0.66666667, 0.66666667])
    """

    name = "imtl"

    def __init__(
        self, loss_scaling: bool = False, lr: float | None = None, gradients: str = "parameters"
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.require(
            isinstance(loss_scaling, bool),
            f"loss_scaling must be true or false: {loss_scaling!r}",
        )
        check.number("lr", lr, "> 0", lambda v: v > 0, optional=True)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.loss_scaling = loss_scaling
        self.lr = lr
        self.log_scales = nn.Parameter(torch.zeros(0), requires_grad=loss_scaling)
        self._index: dict[str, int] = {}  # task -> position in log_scales

    def setup(self, tasks: Mapping[str, Task]) -> None:
        super().setup(tasks)
        if not self.loss_scaling:
            return
        self.log_scales = grown(self.log_scales, self._index, tasks, 0.0)

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        if not self.loss_scaling:
            super().backward(losses, ctx)
            return
        names = list(losses)
        rows = torch.tensor([self._index[t] for t in names], device=self.log_scales.device)
        s = self.log_scales[rows]
        scale = s.detach().exp().tolist()
        super().backward({t: losses[t] * f for t, f in zip(names, scale, strict=True)}, ctx)
        # the s_i's own gradient, e^{s_i}·w_i·L_i − 1 (the model's came from the scaled losses)
        weighted = torch.stack([w.detach().float() for w in ctx.weighted(losses).values()])
        ctx.backward((s.exp() * weighted.to(s)).sum() - s.sum())

    def combine(self, gram: np.ndarray) -> np.ndarray:
        return imtl_g(gram)

    def task_parameters(self, task_names: Sequence[str]) -> list[nn.Parameter]:
        return [self.log_scales] if self.loss_scaling else []

    def optimizer_options(self) -> dict[str, Any]:
        return {} if self.lr is None else {"lr": self.lr}

    def get_extra_state(self) -> dict[str, Any]:
        order = sorted(self._index, key=self._index.__getitem__)
        return {**super().get_extra_state(), "tasks": order}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        saved_task_order(self.name, self._index, state["tasks"])


class AlignedMTLBalancer(GradientBalancer):
    """Aligned-MTL (Senushkin et al., CVPR 2023): the gradient matrix with all singular values
    made equal (condition number 1), so no task's component dominates.

    Args:
        scale_mode: ``σ²``: the smallest non-zero eigenvalue of ``M`` (``"min"``, the paper),
            the median (``"median"``) or the mean (``"rmse"``).
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import AlignedMTLBalancer
        >>> g = np.array([[4.0, 0.0], [0.0, 1.0]])
        >>> AlignedMTLBalancer().combine(g @ g.T) @ g  # both aligned to norm σ = 1, halved
        array([0.5, 0.5])
    """

    name = "aligned_mtl"

    def __init__(self, scale_mode: str = "min", gradients: str = "parameters") -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.choice("scale_mode", scale_mode, ("min", "median", "rmse"))
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.scale_mode = scale_mode

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        return aligned_mtl(gram, np.full(k, 1.0 / k), self.scale_mode)


class UPGradBalancer(GradientBalancer):
    """UPGrad (Quinton & Rey, 2024, TorchJD): each ``g_i/K`` projected onto the dual cone of all
    the gradients, summed; lowers no task's loss to first order.

    Args:
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import UPGradBalancer
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> UPGradBalancer().combine(g @ g.T) @ g  # (¼, ¼) + (0, ½)
        array([0.25, 0.75])
    """

    name = "upgrad"

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        return upgrad(gram, np.full(k, 1.0 / k))


def refuse_representation(check: ArgumentCheck, gradients: object, reason: str) -> None:
    """Check ``gradients`` for a method that needs the gradient rows (``reason``, from its
    ``rows_needed``): only ``"parameters"`` fits (not ``"representation"`` nor ``"gram"``)."""
    check_gradients(check, gradients)
    check.require(
        gradients not in ("representation", "gram"),
        f"gradients: {gradients} does not fit: {reason}; use gradients: parameters",
    )


class _Named(GradientBalancer):
    """A gradient balancer whose ``combine`` needs the step's task names (``self._names``)."""

    def __init__(self, gradients: str = "parameters") -> None:
        super().__init__(gradients)
        self._names: list[str] = []

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        self._names = list(losses)
        super().backward(losses, ctx)


class _LossScaled(GradientBalancer):
    """A gradient balancer whose direction does not grow linearly with the gradients: during a
    step ``self._unit`` holds ``ctx.scale`` of a unit loss (the fp16 loss scale and the ``1/N``
    of accumulation), which the rows carry and the direction must carry too."""

    def __init__(self, gradients: str = "parameters") -> None:
        super().__init__(gradients)
        self._unit = 1.0  # ctx.scale of a unit loss during a step

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        one = next(iter(losses.values())).detach().new_ones(())
        self._unit = float(ctx.scale(one))
        try:
            super().backward(losses, ctx)
        finally:
            self._unit = 1.0


class NashMTLBalancer(_LossScaled, _Named):
    """Nash-MTL (Navon et al., ICML 2022): ``α > 0`` with ``Mα = 1/α``, the Nash bargaining
    solution, by Newton's method warm-started from the last ``α`` (reused between solves).

    Args:
        update_weights_every: Solve every this many steps.
        max_norm: Scale ``α`` so that ``‖d‖ ≤ max_norm`` (0: no clipping; the paper's 1.0).
        max_iter: Newton iterations.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import NashMTLBalancer
        >>> g = np.array([[2.0, 0.0], [0.0, 0.5]])
        >>> NashMTLBalancer(max_norm=0.0).combine(g @ g.T)  # orthogonal: α_i = 1/‖g_i‖
        array([0.5, 2. ])
    """

    name = "nash_mtl"

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        max_iter: int = 100,
        gradients: str = "parameters",
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.integer("update_weights_every", update_weights_every)
        check.number("max_norm", max_norm, ">= 0", lambda v: v >= 0)
        check.integer("max_iter", max_iter)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.update_weights_every = update_weights_every
        self.max_norm = float(max_norm)
        self.max_iter = max_iter
        self._steps = 0  # solves and reuses so far
        self._alpha: dict[str, float] = {}  # the last solution, per task (unscaled)

    def combine(self, gram: np.ndarray) -> np.ndarray:
        names = self._names if len(self._names) == len(gram) else [str(i) for i in range(len(gram))]
        known = all(t in self._alpha for t in names)
        start = np.array([self._alpha[t] for t in names]) if known else None
        # the rows carry ctx.scale (unit), so α here is α_true/unit: α_true is what is kept
        if start is not None and self._steps % self.update_weights_every != 0:
            alpha = start / self._unit
        else:
            alpha = nash_mtl(gram, start, self.max_iter)
            self._alpha.update(zip(names, (alpha * self._unit).tolist(), strict=True))
        self._steps += 1
        norm = math.sqrt(max(float(alpha @ gram @ alpha), 0.0))
        if self.max_norm > 0 and norm > self.max_norm:  # ‖d‖ does not depend on the scale
            alpha = alpha * (self.max_norm / norm)
        return alpha * self._unit

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "steps": self._steps, "alpha": dict(self._alpha)}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._steps = int(state["steps"])
        self._alpha = {t: float(a) for t, a in state["alpha"].items()}


class FairGradBalancer(_LossScaled):
    """FairGrad (Ban & Ji, ICML 2024): the update that allocates first-order progress to the
    tasks by ``alpha``-fair utility, ``w > 0`` with ``Mw = w^{−1/alpha}`` (``alpha = 1`` is
    Nash-MTL's equation; larger ``alpha`` favours the task that progresses least).

    Args:
        alpha: ``α > 0``, the fairness (1: proportional fairness; → ∞: max-min fairness).
        max_iter: Newton iterations.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import FairGradBalancer
        >>> g = np.array([[2.0, 0.0], [0.0, 0.5]])
        >>> FairGradBalancer(alpha=1.0).combine(g @ g.T)  # orthogonal: w_i = 1/‖g_i‖
        array([0.5, 2. ])
    """

    name = "fairgrad"

    def __init__(
        self, alpha: float = 1.0, max_iter: int = 100, gradients: str = "parameters"
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("alpha", alpha, "> 0 (1 is Nash-MTL's equation)", lambda v: v > 0)
        check.integer("max_iter", max_iter)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.alpha = float(alpha)
        self.max_iter = max_iter

    def combine(self, gram: np.ndarray) -> np.ndarray:
        # the rows carry ctx.scale (unit): solve on the true Gram matrix, whose w the rows take
        return fairgrad(gram / self._unit**2, self.alpha, None, self.max_iter)


class GradVacBalancer(Seeded, _Named):
    """GradVac, gradient vaccine (Wang et al., ICLR 2021): lifts each pair's gradient cosine to an
    EMA target (initially 0, i.e. PCGrad), so agreeing tasks are pulled closer too.

    Args:
        beta: EMA rate of the targets (the paper's ``β = 0.01``).
        group: ``"model"``: one target per pair on the whole shared vector; ``"module"``: one
            per pair and shared module (the paper's per-layer variant at module granularity).
        seed: Seed of the order generator.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`; those two take ``group="model"``: the representation has
            no modules, and one backward pass cannot apply per-module coefficients).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import GradVacBalancer
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> GradVacBalancer().combine(g @ g.T) @ g  # first step, targets 0: like PCGrad
        array([0.5, 1.5])
    """

    name = "gradvac"

    def __init__(
        self, beta: float = 0.01, group: str = "model", seed: int = 0, gradients: str = "parameters"
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("beta", beta, "in (0, 1]", lambda v: 0 < v <= 1)
        check.choice("group", group, ("model", "module"))
        check_gradients(check, gradients)
        check.require(
            gradients not in ("representation", "gram") or group != "module",
            f"group: module {MODULE_GROUPS}; with gradients: {gradients} use group: model",
        )
        check.done()
        super().__init__(seed)
        self.gradients = gradients
        self.beta = float(beta)
        self.group = group
        self._targets: dict[str, float] = {}  # "group|i|j" -> φ̂_ij

    def _coefficients(self, gram: np.ndarray, group: str) -> np.ndarray:
        k = len(gram)
        names = self._names if len(self._names) == k else [str(i) for i in range(k)]
        keys = [[f"{group}|{a}|{b}" for b in names] for a in names]
        targets = np.array([[self._targets.get(key, 0.0) for key in row] for row in keys])
        orders = (torch.randperm(k, generator=self._gen).tolist() for _ in range(k))
        beta = gradvac_coefficients(gram, targets, orders, self.beta)
        for i, row in enumerate(keys):
            for j, key in enumerate(row):
                if i != j:
                    self._targets[key] = float(targets[i, j])
        return beta

    def combine(self, gram: np.ndarray) -> np.ndarray:
        return self._coefficients(gram, "")

    def rows_needed(self) -> str:
        return f"group: module {MODULE_GROUPS}" if self.group == "module" else ""

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout
    ) -> tuple[torch.Tensor, np.ndarray]:
        if self.group == "model":
            return super().direction(rows, layout)
        out = torch.empty_like(rows[0])
        total = np.zeros(len(rows))
        for module, start, stop in layout.modules:
            part = rows[:, start:stop]
            gram = (part @ part.T).double().cpu().numpy()
            beta = (
                self._coefficients(gram, module) if np.isfinite(gram).all() else np.ones(len(rows))
            )
            out[start:stop] = torch.from_numpy(beta).to(rows) @ part
            total += beta * (stop - start) / layout.size
        return out, total  # logged: the size-weighted mean of the modules' coefficients

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "targets": dict(self._targets)}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._targets = {k: float(v) for k, v in state["targets"].items()}


class DBMTLBalancer(_Named):
    """DB-MTL, dual-balancing (Lin et al., 2023): every task trains on ``log L_i``, and an EMA of
    each task's shared gradient is scaled to the largest norm.

    Args:
        beta: ``β``, the EMA weight of the past.
        beta_sigma: ``β_σ``, the decay of ``β_t`` with the step ``t``.
        eps: Added to the losses in the log (and to the norms).
        gradients: Only ``"parameters"``: the average of gradient rows over steps has no
            meaning at the representation (see :meth:`rows_needed`).

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build("db_mtl").beta
        0.9
    """

    name = "db_mtl"

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        eps: float = 1e-8,
        gradients: str = "parameters",
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("beta", beta, "in [0, 1)", lambda v: 0 <= v < 1)
        check.number("beta_sigma", beta_sigma, ">= 0", lambda v: v >= 0)
        check.number("eps", eps, "> 0", lambda v: v > 0)
        refuse_representation(check, gradients, self.rows_needed())
        check.done()
        super().__init__(gradients)
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self._ema: torch.Tensor | None = None  # (K, P) averaged ∇log L_i
        self._ema_tasks: list[str] = []
        self._t = 0

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        names = list(losses)
        values = ctx.reduce(torch.stack([losses[t].detach() for t in names]).double())
        require_non_negative(self.name, names, values.tolist())
        # L_i / (L̄_i + ε) has the gradient of log(L̄_i + ε) once DDP averages it over ranks
        logs = {
            t: losses[t] / (v + self.eps).to(losses[t].dtype)
            for t, v in zip(names, values, strict=True)
        }
        super().backward(logs, ctx)

    def rows_needed(self) -> str:
        return (
            "it averages each task's gradient row over steps, and at the representation the "
            "rows of different steps hold different examples"
        )

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout
    ) -> tuple[torch.Tensor, np.ndarray]:
        if self._ema is None or self._ema_tasks != self._names or self._ema.shape != rows.shape:
            self._ema, self._ema_tasks, self._t = torch.zeros_like(rows), list(self._names), 0
        norms = rows.norm(dim=1).double().cpu().numpy()
        if not np.isfinite(norms).all():  # fp16 overflow: the grad scaler skips this step, and
            return rows.sum(dim=0), np.ones(len(rows))  # the average keeps its finite values
        ema = self._ema.to(rows)
        self._t += 1
        beta_t = self.beta / self._t**self.beta_sigma
        ema = rows + beta_t * (ema - rows)
        self._ema = ema
        norms = ema.norm(dim=1).double().cpu().numpy()
        alpha = norms.max() / (norms + self.eps)
        return torch.from_numpy(alpha).to(rows) @ ema, alpha

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "ema": None if self._ema is None else self._ema.detach().cpu().clone(),
            "ema_tasks": list(self._ema_tasks),
            "t": self._t,
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._ema = None if state["ema"] is None else state["ema"].clone()
        self._ema_tasks = list(state["ema_tasks"])
        self._t = int(state["t"])


class SDMGradBalancer(_Named):
    """SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao et al.,
    NeurIPS 2023): MGDA's min-norm problem regularised toward the mean gradient,
    ``min_{w ∈ simplex} ½‖G_w + λ·g_0‖²``, solved by a few warm-started projected SGD steps;
    ``d = (G_w + λ·g_0)/(1 + λ)``.

    Args:
        lam: ``λ ≥ 0``, the pull toward the mean gradient ``g_0`` (0: MGDA; large: the mean).
        lr: Learning rate of the inner SGD on ``w``.
        momentum: Momentum of the inner SGD, in ``[0, 1)``.
        n_iter: Inner SGD steps per update.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import SDMGradBalancer
        >>> g = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> SDMGradBalancer().combine(g @ g.T)  # symmetric tasks: the mean
        array([0.5, 0.5])
    """

    name = "sdmgrad"

    def __init__(
        self,
        lam: float = 0.3,
        lr: float = 5.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        gradients: str = "parameters",
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("lam", lam, ">= 0", lambda v: v >= 0)
        check.number("lr", lr, "> 0", lambda v: v > 0)
        check.number("momentum", momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        check.integer("n_iter", n_iter)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.lam, self.lr, self.momentum = float(lam), float(lr), float(momentum)
        self.n_iter = n_iter
        self._w: list[float] = []  # the inner solution, warm start of the next update
        self._w_tasks: list[str] = []

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        names = self._names if len(self._names) == k else [str(i) for i in range(k)]
        start = np.array(self._w) if self._w_tasks == names else np.full(k, 1.0 / k)
        w = sdmgrad_weights(gram, start, self.lam, self.lr, self.momentum, self.n_iter)
        self._w, self._w_tasks = w.tolist(), list(names)
        return (w + self.lam / k) / (1 + self.lam)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "w": list(self._w), "w_tasks": list(self._w_tasks)}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._w = [float(v) for v in state["w"]]
        self._w_tasks = list(state["w_tasks"])


class MoCoBalancer(_LossScaled, _Named):
    """MoCo (Fernando et al., ICLR 2023): each task's gradient is tracked by a running average
    ``y_i`` (which corrects the bias of stochastic MGDA), and the weights ``λ`` take one projected
    gradient step per update on ``½λᵀ(YYᵀ + ρI)λ``; ``d = Σ_i λ_i y_i``.

    Args:
        beta: ``β``, the step of the tracking average (``β_t = β/t^{beta_sigma}``).
        beta_sigma: Decay exponent of ``β_t``.
        gamma: ``γ``, the step of the weights (``γ_t = γ/t^{gamma_sigma}``).
        gamma_sigma: Decay exponent of ``γ_t``.
        rho: ``ρ ≥ 0``, the L2 regularisation of the weights' update.
        projection: ``"softmax"`` (the authors' code and LibMTL: ``λ ← softmax(λ − γ_t·…)``) or
            ``"simplex"`` (the paper: the Euclidean projection onto the simplex).
        normalize: Track ``L_i·g_i/‖g_i‖`` instead of ``g_i`` (the authors' code and LibMTL).
        gradients: Only ``"parameters"``: the method keeps per-parameter gradient state
            (see :meth:`rows_needed`).

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build({"name": "moco", "projection": "simplex"}).gamma
        0.1
    """

    name = "moco"

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        projection: str = "softmax",
        normalize: bool = True,
        gradients: str = "parameters",
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        refuse_representation(check, gradients, self.rows_needed())
        check.number("beta", beta, "in (0, 1]", lambda v: 0 < v <= 1)
        check.number("beta_sigma", beta_sigma, ">= 0", lambda v: v >= 0)
        check.number("gamma", gamma, "> 0", lambda v: v > 0)
        check.number("gamma_sigma", gamma_sigma, ">= 0", lambda v: v >= 0)
        check.number("rho", rho, ">= 0", lambda v: v >= 0)
        check.choice("projection", projection, ("softmax", "simplex"))
        check.require(
            isinstance(normalize, bool), f"normalize must be true or false: {normalize!r}"
        )
        check.done()
        super().__init__(gradients)
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.projection, self.normalize = projection, normalize
        self._y: torch.Tensor | None = None  # (K, P) tracked gradients, without ctx.scale
        self._lambda: list[float] = []
        self._y_tasks: list[str] = []
        self._t = 0
        self._values: list[float] = []  # the step's (rank-averaged) loss values

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        stacked = torch.stack([v.detach().double() for v in ctx.weighted(losses).values()])
        self._values = ctx.reduce(stacked).tolist()
        super().backward(losses, ctx)

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout
    ) -> tuple[torch.Tensor, np.ndarray]:
        k = len(rows)
        if self._y is None or self._y_tasks != self._names or self._y.shape != rows.shape:
            self._y, self._y_tasks, self._t = torch.zeros_like(rows), list(self._names), 0
            self._lambda = [1.0 / k] * k
        if not torch.isfinite(rows).all():  # fp16 overflow: the grad scaler skips this step
            return rows.sum(dim=0), np.ones(k)
        if self.normalize:  # L_i·g_i/(‖g_i‖ + 10⁻⁸), the rows' ctx.scale cancels
            norms = rows.norm(dim=1, keepdim=True) + 1e-8 * self._unit
            values = torch.tensor(self._values, dtype=rows.dtype, device=rows.device)
            h = rows / norms * values[:, None]
        else:
            h = rows / self._unit
        self._t += 1
        y = self._y.to(rows)
        y = y - self.beta / self._t**self.beta_sigma * (y - h)
        self._y = y
        gram = (y @ y.T).double().cpu().numpy() + self.rho * np.eye(k)
        lam = np.array(self._lambda)
        lam = lam - self.gamma / self._t**self.gamma_sigma * (gram @ lam)
        if self.projection == "softmax":
            lam = np.exp(lam - lam.max())
            lam = lam / lam.sum()
        else:
            lam = project_simplex(lam)
        self._lambda = lam.tolist()
        return self._unit * (torch.from_numpy(lam).to(rows) @ y), lam

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "y": None if self._y is None else self._y.detach().cpu().clone(),
            "lambda": list(self._lambda),
            "y_tasks": list(self._y_tasks),
            "t": self._t,
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._y = None if state["y"] is None else state["y"].clone()
        self._lambda = [float(v) for v in state["lambda"]]
        self._y_tasks = list(state["y_tasks"])
        self._t = int(state["t"])


class ExcessMTLBalancer(_LossScaled, _Named):
    """ExcessMTL (He et al., ICML 2024): loss weights that grow with each task's estimated excess
    risk ``g_iᵀH_i⁻¹g_i`` (``H_i`` the AdaGrad diagonal ``√(Σ_t g_i² + 10⁻⁷)``) relative to its
    first value, by an exponentiated-gradient step; ``d = Σ_i w_i g_i`` with ``Σ_i w_i = K``.

    Args:
        robust_step_size: ``η > 0``, the step of the exponentiated update (LibMTL's 0.01).
        gradients: Only ``"parameters"``: the method keeps per-parameter gradient state
            (see :meth:`rows_needed`).

    Example:
        >>> from mtlgraph.balancing import BALANCERS
        >>> BALANCERS.build({"name": "excess_mtl", "robust_step_size": 0.1}).robust_step_size
        0.1
    """

    name = "excess_mtl"

    def __init__(self, robust_step_size: float = 0.01, gradients: str = "parameters") -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("robust_step_size", robust_step_size, "> 0", lambda v: v > 0)
        refuse_representation(check, gradients, self.rows_needed())
        check.done()
        super().__init__(gradients)
        self.robust_step_size = float(robust_step_size)
        self._sq: torch.Tensor | None = None  # (K, P) Σ_t g_i² of the unscaled gradients
        self._sq_tasks: list[str] = []
        self._baseline: list[float] = []  # each task's first positive excess risk (0: none yet)
        self._logits: list[float] = []  # log-weights: w = K·softmax(logits)

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout
    ) -> tuple[torch.Tensor, np.ndarray]:
        k = len(rows)
        if self._sq is None or self._sq_tasks != self._names or self._sq.shape != rows.shape:
            self._sq, self._sq_tasks = torch.zeros_like(rows), list(self._names)
            self._baseline, self._logits = [0.0] * k, [0.0] * k
        if not torch.isfinite(rows).all():  # fp16 overflow: the grad scaler skips this step
            return rows.sum(dim=0), np.ones(k)
        g2 = (rows / self._unit) ** 2
        self._sq = self._sq.to(rows) + g2
        excess = (g2 / torch.sqrt(self._sq + 1e-7)).sum(dim=1).double().cpu().tolist()
        for i, e in enumerate(excess):
            if self._baseline[i] > 0:
                self._logits[i] += self.robust_step_size * e / self._baseline[i]
            elif e > 0:
                self._baseline[i] = e  # the first excess risk is the task's scale
        logits = np.array(self._logits)
        w = np.exp(logits - logits.max())
        w = k * w / w.sum()
        return torch.from_numpy(w).to(rows) @ rows, w

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "squared_gradients": None if self._sq is None else self._sq.detach().cpu().clone(),
            "squared_tasks": list(self._sq_tasks),
            "baseline": list(self._baseline),
            "logits": list(self._logits),
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        sq = state["squared_gradients"]
        self._sq = None if sq is None else sq.clone()
        self._sq_tasks = list(state["squared_tasks"])
        self._baseline = [float(v) for v in state["baseline"]]
        self._logits = [float(v) for v in state["logits"]]


class FAMOBalancer(LastWeights):
    """FAMO, fast adaptive multitask optimization (Liu et al., NeurIPS 2023), one backward pass:
    softmax task logits learned (by their own Adam) from the change of the log-losses; tasks whose
    loss fell least gain weight. The "after" losses are those of the next step holding the task.

    Args:
        lr: Learning rate of the logits' own Adam.
        gamma: Weight decay of the logits (their pull back to equal weights).
        eps: Added to the losses before the log.

    Example:
        >>> from mtlgraph.balancing import FAMOBalancer
        >>> b = FAMOBalancer()
        >>> b._update(["a", "b"], [2.0, 1.0], [1.0, 1.0])  # a's loss halved, b's unchanged
        >>> {t: round(x, 4) for t, x in b._logits.items()}  # Adam's first step: ∓lr
        {'a': -0.025, 'b': 0.025}
    """

    name = "famo"

    def __init__(self, lr: float = 0.025, gamma: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__()
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("lr", lr, "> 0", lambda v: v > 0)
        check.number("gamma", gamma, ">= 0", lambda v: v >= 0)
        check.number("eps", eps, "> 0", lambda v: v > 0)
        check.done()
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self._logits: dict[str, float] = {}
        self._adam: dict[str, list[float]] = {}  # task -> [m, v, steps]
        self._prev: dict[str, float] = {}  # each task's loss at the last step that held it

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        weighted = ctx.weighted(losses)
        names = list(weighted)
        stacked = torch.stack([weighted[t].detach().double() for t in names])
        values = ctx.reduce(stacked).tolist()  # every rank weighs with the same numbers
        if not all(math.isfinite(v) and v >= 0 for v in values):
            ctx.weighted_backward(losses, {t: self._last.get(t, 1.0) for t in names})
            return
        seen = [i for i, t in enumerate(names) if t in self._prev]
        if len(seen) > 1:  # the logits of tasks with a previous loss (all, with mixed steps)
            known = [names[i] for i in seen]
            self._update(known, [self._prev[t] for t in known], [values[i] for i in seen])
        self._prev.update(zip(names, values, strict=True))
        logits = [self._logits.get(t, 0.0) for t in names]
        top = max(logits)
        z = [math.exp(x - top) for x in logits]
        inv = [zi / (v + self.eps) for zi, v in zip(z, values, strict=True)]
        c = 1.0 / sum(inv)
        w = {t: c * x for t, x in zip(names, inv, strict=True)}
        self._last.update(w)
        ctx.weighted_backward(losses, w)

    def _update(self, names: list[str], before: list[float], after: list[float]) -> None:
        """One Adam step of the logits on ``J_softmax(ξ)ᵀ δ`` (plus the decay ``gamma·ξ``)."""
        logits = [self._logits.get(t, 0.0) for t in names]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        z = [x / sum(e) for x in e]
        delta = [
            math.log(b + self.eps) - math.log(a + self.eps)
            for b, a in zip(before, after, strict=True)
        ]
        mean = sum(zi * di for zi, di in zip(z, delta, strict=True))
        for t, x, zi, di in zip(names, logits, z, delta, strict=True):
            grad = zi * (di - mean) + self.gamma * x
            self._logits[t] = x - adam_step(self._adam, t, grad, self.lr)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            **super().get_extra_state(),
            "logits": dict(self._logits),
            "adam": {t: list(s) for t, s in self._adam.items()},
            "previous_losses": dict(self._prev),
        }

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._logits = {t: float(v) for t, v in state["logits"].items()}
        self._adam = {t: [float(x) for x in s] for t, s in state["adam"].items()}
        self._prev = {t: float(v) for t, v in state["previous_losses"].items()}
