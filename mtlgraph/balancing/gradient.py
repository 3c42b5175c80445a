"""Gradient-based balancers (``pcgrad``, ``mgda``, ``cagrad``): combine per-task gradients of the
shared parameters, with coefficients from their Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean
from mtlgraph.balancing.base import LastWeights, Seeded, StepContext
from mtlgraph.balancing.solvers import cagrad_solve, min_norm, pcgrad_coefficients
from mtlgraph.exceptions import ArgumentCheck, ConfigError
from mtlgraph.gradients import (
    PlanCache,
    Representation,
    SharedGradients,
    SharedLayout,
    accumulate_grad,
    build_representation,
    gramian,
    own_gradients,
    representation_backward,
    representation_rows,
)
from mtlgraph.graph.task import Task

GRADIENT_MODES = ("parameters", "representation", "gram")
"""Where a gradient balancer takes the per-task gradients (its ``gradients`` argument); ``"gram"``:
on the shared parameters, but only their ``K × K`` Gram matrix, then one backward pass of
``Σ_i β_i L_i`` (``docs/balancing.md``)."""


def check_gradients(check: ArgumentCheck, gradients: object) -> None:
    """Record a problem in ``check`` unless ``gradients`` is one of :data:`GRADIENT_MODES`
    (suggesting the mode it abbreviates or misspells)."""
    if gradients in GRADIENT_MODES:
        return
    text = gradients if isinstance(gradients, str) else ""
    prefixed = [m for m in GRADIENT_MODES if text and m.startswith(text.lower())]
    hint = f" (did you mean '{prefixed[0]}'?)" if prefixed else did_you_mean(text, GRADIENT_MODES)
    *first, last = [repr(m) for m in GRADIENT_MODES]
    modes = f"{', '.join(first)} or {last}"
    check.require(False, f"gradients must be {modes}, got {gradients!r}{hint}")


class GradientBalancer(LastWeights):
    """Base of methods that combine per-task gradients ``g_i`` of the shared parameters.

    Subclasses implement :meth:`combine` (Gram matrix ``M_ij = g_i·g_j`` -> ``β``); the shared
    parameters get ``d = Σ_i β_i g_i``, the others their one task's gradient.

    Args:
        gradients: ``"parameters"``: ``g_i = ∇_{θ_s} L_i`` on the shared parameters;
            ``"representation"``: ``g_i = ∂L_i/∂Z`` at the shared representation ``Z`` the
            tasks read, combined there and sent through the shared part in one backward pass
            (MGDA-UB; ``docs/balancing.md``); ``"gram"``: only the Gram matrix of the
            parameter-level ``g_i``, computed a chunk of parameters at a time, then ``d`` from
            one backward pass of ``Σ_i β_i L_i`` (memory ``P + K²`` plus one chunk's Jacobian,
            at most :attr:`gram_values` values, or the largest shared parameter's ``K`` rows).

    Attributes:
        gram_values: Most values of one Jacobian chunk with ``gradients="gram"``.
        tasks_per_pass: Most tasks one vmapped backward pass takes (``0``: all the step's tasks;
            ``1``: one pass per task; ``None``, the default: all where the shared parameters
            live on an accelerator, one pass per task on the CPU): the transient memory of the
            pass is that many times each activation's gradient.
    """

    gram_values: int = 1 << 24  # most values of one Jacobian chunk in "gram" mode
    tasks_per_pass: int | None = None  # tasks a vmapped pass takes (0: all; None: by device)

    def __init__(self, gradients: str = "parameters") -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check_gradients(check, gradients)
        check.done()
        super().__init__()
        self.gradients = gradients  # a subclass checks it with its other arguments
        self._grads = SharedGradients()
        self._representations = PlanCache[Representation]()

    @property
    def needs_outputs(self) -> bool:
        return self.gradients == "representation"

    def combine(self, gram: np.ndarray) -> np.ndarray:
        """Coefficients ``β`` (shape ``(K,)``, float64) of the update ``d = Σ_i β_i g_i``."""
        raise NotImplementedError

    def rows_needed(self) -> str:
        """Why this method needs the gradient rows themselves, not only their Gram matrix
        (``""``: it does not), which representation-level gradients cannot give: by default, a
        subclass that overrides :meth:`direction` does."""
        if type(self).direction is GradientBalancer.direction:
            return ""
        return f"{type(self).__name__} overrides direction(), which combines gradient rows"

    def setup(self, tasks: Mapping[str, Task]) -> None:
        self._grads.clear()  # freezing may have changed which parameters are trainable
        self._representations.clear()
        reason = self.rows_needed() if self.gradients != "parameters" else ""
        if reason:
            what = (
                "take gradients at the representation"
                if self.gradients == "representation"
                else "run with gradients: gram"
            )
            raise ConfigError(
                [f"balancer '{self.name}' cannot {what}: {reason}; use gradients: parameters"]
            )

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        weighted = ctx.weighted(losses)
        names = list(weighted)
        if self._backward_single_task(weighted, ctx):
            self._last[names[0]] = 1.0
            return
        rep = self.representation(ctx) if self.gradients == "representation" else None
        layout = self._grads.layout(ctx.tasks, ctx.plan) if rep is None else rep.layout
        if layout.size == 0:
            self._say_once(
                "unshared",
                "%s: tasks %s share no trainable parameter; each gets its own gradient",
                self.name,
                names,
            )
            ctx.weighted_backward(losses, {})
            return
        if rep is not None:
            self._representation_backward(rep, weighted, ctx)
            return
        layout.tasks_per_pass = self.tasks_per_pass
        if self.gradients == "gram":
            beta = self._gram_backward(layout, weighted, ctx)
            self._last.update(zip(names, beta.tolist(), strict=True))
            return
        buffer = self._grads.compute(
            layout, weighted, ctx.scale, accumulate_own=True, reduce=ctx.reduce
        )
        direction, beta = self.direction(buffer, layout)
        for p, (offset, n) in zip(layout.shared, layout.slices, strict=True):
            accumulate_grad(p, direction[offset : offset + n].view_as(p))
        self._last.update(zip(names, beta.tolist(), strict=True))

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The shared update from the gradient rows ``(K, P)`` and the coefficients to log
        (default: ``d = Σ_i β_i g_i``, ``β = combine(Gram)``)."""
        beta = self.coefficients((rows @ rows.T).double().cpu().numpy())
        return torch.from_numpy(beta).to(rows) @ rows, beta

    def _gram_backward(
        self, layout: SharedLayout, weighted: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> np.ndarray:
        """``gradients="gram"``: task-only gradients, the Gram matrix (rank-averaged chunks under
        DDP), ``β``, then ``d = ∇_{θ_s} Σ_i β_i L_i`` in one pass (averaged: ``Σ_i β_i ḡ_i``)."""
        names = list(weighted)
        scaled = [ctx.scale(weighted[t]) for t in names]
        own_gradients(layout, names, scaled, ctx.reduce)
        gram = gramian(layout, scaled, self.gram_values, ctx.reduce)
        beta = self.coefficients(gram.cpu().numpy())
        total = scaled[0] * float(beta[0])
        for b, loss in zip(beta[1:].tolist(), scaled[1:], strict=True):
            total = total + loss * b
        grads = torch.autograd.grad(total, layout.shared, allow_unused=True, materialize_grads=True)
        for p, g in zip(layout.shared, grads, strict=True):
            accumulate_grad(p, ctx.reduce(g))
        return beta

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        """``combine(gram)`` as float64; all ones when ``gram`` is not finite (an overflow under
        fp16 loss scaling: the grad scaler will skip this step)."""
        if np.isfinite(gram).all():
            return np.asarray(self.combine(gram), dtype=np.float64)
        return np.ones(len(gram))

    def representation(self, ctx: StepContext) -> Representation:
        """The (cached) :class:`~mtlgraph.gradients.Representation` of the step's plan."""
        return self._representations.get(ctx.plan, lambda p: build_representation(ctx.tasks, p))

    def _representation_backward(
        self, rep: Representation, weighted: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> None:
        """The update from gradients at the representation ``Z``: per task ``r_i = ∂L_i/∂Z``
        (and its own parameters' gradient), ``β = combine(R Rᵀ)``, then one backward pass of
        ``Σ_i β_i r_i`` from ``Z`` into the shared parameters.

        Under DDP each rank's ``Z`` holds its own examples: the Gram matrix is summed over the
        ranks (the Gram of all ranks' examples together, of the rank-averaged losses), so every
        rank gets the same ``β``; the shared gradients are then averaged like DDP's own."""
        names = list(weighted)
        if rep.problems:
            raise ConfigError(
                [
                    f"balancer '{self.name}', gradients: representation: {p}; use gradients: "
                    "parameters for this model"
                    for p in rep.problems
                ]
            )
        if not ctx.outputs:
            raise ConfigError(
                [
                    f"balancer '{self.name}' with gradients: representation needs the step's "
                    "forward outputs in StepContext.outputs (the Trainer passes them; by hand: "
                    "model.calculate_loss(X, Y, outputs=outputs))"
                ]
            )
        found = representation_rows(rep, weighted, ctx.outputs, ctx.scale, ctx.reduce)
        rows = found.rows
        gram = rows @ rows.T
        if ctx.world_size > 1:
            gram = ctx.reduce(gram) / ctx.world_size
        beta = self.coefficients(gram.double().cpu().numpy())
        direction = torch.from_numpy(beta).to(rows) @ rows
        reduce = ctx.reduce if ctx.world_size > 1 else None
        representation_backward(rep, found.tensors, direction, reduce)
        self._last.update(zip(names, beta.tolist(), strict=True))


class PCGradBalancer(Seeded, GradientBalancer):
    """PCGrad, gradient surgery (Yu et al., NeurIPS 2020): each task's gradient loses its
    components that conflict with the others' (in an order from its own seeded generator); summed.

    Args:
        seed: Seed of the shuffling generator.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import PCGradBalancer
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> PCGradBalancer().combine(g @ g.T) @ g  # (0.5, 0.5) + (0, 1)
        array([0.5, 1.5])
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0, gradients: str = "parameters") -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check_gradients(check, gradients)
        check.done()
        super().__init__(seed)
        self.gradients = gradients

    def combine(self, gram: np.ndarray) -> np.ndarray:
        k = len(gram)
        orders = (torch.randperm(k, generator=self._gen).tolist() for _ in range(k))
        return pcgrad_coefficients(gram, orders)


class MGDABalancer(GradientBalancer):
    """MGDA, the min-norm point of the gradients' convex hull (Sener & Koltun, NeurIPS 2018),
    by pairwise Frank–Wolfe; to first order a step lowers every task's loss.

    Args:
        rescale: Multiply the direction by the number of tasks in the step.
        max_iter: Frank–Wolfe iterations (more than two tasks).
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import MGDABalancer
        >>> g = np.array([[2.0, 0.0], [0.0, 1.0]])
        >>> MGDABalancer(rescale=False).combine(g @ g.T)  # α_1 = (1 − 0)/(4 + 1)
        array([0.2, 0.8])
    """

    name = "mgda"

    def __init__(
        self, rescale: bool = True, max_iter: int = 250, gradients: str = "parameters"
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.require(isinstance(rescale, bool), f"rescale must be true or false: {rescale!r}")
        check.integer("max_iter", max_iter)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
        self.rescale = rescale
        self.max_iter = max_iter

    def combine(self, gram: np.ndarray) -> np.ndarray:
        alpha = min_norm(gram, self.max_iter)
        return alpha * len(gram) if self.rescale else alpha


class CAGradBalancer(GradientBalancer):
    """CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021): the mean gradient
    plus the direction that most helps the worst task within radius ``c``; ``c = 0`` is the mean.

    Args:
        c: Conflict-aversion radius, in ``[0, 1)``.
        rescale: Divide the direction by ``1 + c²``.
        max_iter: Solver iterations.
        gradients: ``"parameters"``, ``"representation"`` or ``"gram"`` (see
            :class:`GradientBalancer`).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.balancing import CAGradBalancer
        >>> g = np.array([[1.0, 0.0], [-0.5, 1.0]])
        >>> CAGradBalancer(c=0.0).combine(g @ g.T)  # the mean
        array([0.5, 0.5])
    """

    name = "cagrad"

    def __init__(
        self,
        c: float = 0.4,
        rescale: bool = True,
        max_iter: int = 100,
        gradients: str = "parameters",
    ) -> None:
        check = ArgumentCheck(f"balancer '{self.name}'")
        check.number("c", c, "in [0, 1)", lambda v: 0 <= v < 1)
        check.require(isinstance(rescale, bool), f"rescale must be true or false: {rescale!r}")
        check.integer("max_iter", max_iter)
        check_gradients(check, gradients)
        check.done()
        super().__init__(gradients)
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
        """``argmin_{w ∈ simplex} w·M·𝟙/K + √φ·√(wᵀMw)`` (see :func:`.solvers.cagrad_solve`)."""
        return cagrad_solve(gram, sqrt_phi, self.max_iter)
