"""Numeric solvers of the gradient-based balancers, on the Gram matrix ``M_ij = g_i·g_j`` of
per-task gradients (a ``(K, K)`` float64 array), so their cost does not depend on the model's
size; and :func:`adam_step`, the scalar Adam of learned balancer weights. Formulas and papers:
``docs/balancing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def pcgrad_coefficients(gram: np.ndarray, orders: Iterable[list[int]]) -> np.ndarray:
    """PCGrad (Yu et al. 2020) as coefficients ``β`` of ``d = Σ_k β_k g_k``.

    For each task ``i`` (with the next order of ``orders``, a permutation of ``0..K-1``):
    ``g_i' = g_i``; for each other ``j`` in that order, if ``g_i'·g_j < 0`` then
    ``g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²)·g_j``. Returns the coefficients of ``Σ_i g_i'``.

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> pcgrad_coefficients(g @ g.T, [[0, 1], [0, 1]]) @ g  # (0.5, 0.5) + (0, 1)
        array([0.5, 1.5])
    """
    k = len(gram)
    total = np.zeros(k)
    for i, order in zip(range(k), orders, strict=False):
        c = np.zeros(k)  # g_i' = Σ_k c_k g_k
        c[i] = 1.0
        for j in order:
            if j == i or gram[j, j] <= 0:
                continue
            dot = float(c @ gram[:, j])
            if dot < 0:
                c[j] -= dot / gram[j, j]
        total += c
    return total


def min_norm(gram: np.ndarray, max_iter: int = 250, tol: float = 1e-10) -> np.ndarray:
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


def line_min(
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


def cagrad_solve(gram: np.ndarray, sqrt_phi: float, max_iter: int = 100) -> np.ndarray:
    """``argmin_{w ∈ simplex} w·M·𝟙/K + √φ·√(wᵀMw)`` by pairwise Frank–Wolfe (CAGrad's inner
    problem), each step an exact :func:`line_min`; starts from the uniform point.

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> cagrad_solve(g @ g.T, 0.5)  # symmetric tasks: the uniform point
        array([0.5, 0.5])
    """
    k = len(gram)
    lin = gram.mean(axis=1)  # g_i·g_0
    w = np.full(k, 1.0 / k)
    for _ in range(max_iter):
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
        gamma, _ = line_min(float(lin @ w), d_lin, sqrt_phi, q2, q1, q0, hi)
        if gamma <= 0:
            break
        w[t] += gamma
        w[s] -= gamma
        if w[s] < 1e-15:
            w[s] = 0.0
    return w


def imtl_g(gram: np.ndarray) -> np.ndarray:
    """IMTL-G (Liu et al., ICLR 2021): ``α`` with ``Σ_i α_i = 1`` such that ``d = Σ_i α_i g_i``
    has the same projection on every unit gradient ``u_i = g_i/‖g_i‖``.

    ``d·u_i = (Mα)_i/‖g_i‖`` equal for all ``i`` gives ``Mα ∝ (‖g_1‖, …, ‖g_K‖)``, so
    ``α = v/Σ_j v_j`` with ``v = M⁺·‖g‖`` (the pseudo-inverse also covers linearly dependent
    gradients); all zeros when ``Σ_j v_j`` vanishes.

    Example:
        >>> import numpy as np
        >>> g = np.array([[2.0, 0.0], [0.0, 1.0]])
        >>> imtl_g(g @ g.T)  # d = (2/3, 2/3): equal projections 2/3 on both unit vectors
        array([0.33333333, 0.66666667])
    """
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    v = np.linalg.pinv(gram, hermitian=True) @ norms
    total = float(v.sum())
    return np.zeros(len(gram)) if abs(total) < 1e-12 else v / total


def aligned_mtl(gram: np.ndarray, weights: np.ndarray, scale_mode: str = "min") -> np.ndarray:
    """Aligned-MTL (Senushkin et al., CVPR 2023): ``B·w`` with ``G̃ᵀw = Gᵀ B w``, ``G̃`` the
    gradient matrix with every kept singular value set to ``√λ_s`` (``scale_mode``: the smallest
    kept eigenvalue of ``M``, the median or the mean); ``w`` when every gradient is zero.

    Example:
        >>> import numpy as np
        >>> g = np.array([[4.0, 0.0], [0.0, 1.0]])
        >>> aligned_mtl(g @ g.T, np.array([0.5, 0.5]))  # both rescaled to norm 1
        array([0.125, 0.5  ])
    """
    lam, vecs = np.linalg.eigh(gram)
    tol = float(lam.max(initial=0.0)) * len(gram) * np.finfo(np.float64).eps
    keep = lam > tol
    if not keep.any():
        return np.asarray(weights, dtype=np.float64)
    lam, vecs = lam[keep], vecs[:, keep]
    ordered = np.sort(lam)
    scale = {"min": ordered[0], "median": ordered[(len(lam) - 1) // 2], "rmse": lam.mean()}[
        scale_mode
    ]
    b = math.sqrt(float(scale)) * (vecs / np.sqrt(lam)) @ vecs.T
    return b @ weights


def dual_cone_weights(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``v = argmin_{v ≥ u} vᵀMv``: the projection of ``Σ_i u_i g_i`` onto the dual cone of the
    gradients ``{x : g_i·x ≥ 0 ∀i}`` is ``Σ_i v_i g_i`` (Quinton & Rey 2024, Proposition 1).

    Solved exactly as non-negative least squares in ``s = v − u ≥ 0`` (Lawson–Hanson active
    set, ``scipy.optimize.nnls``): ``vᵀMv = ‖A(u + s)‖²`` with ``A = Λ^{1/2}Vᵀ`` from
    ``M = VΛVᵀ``. ``M`` is scaled by its trace first (the solution does not depend on it).

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> dual_cone_weights(g @ g.T, np.array([1.0, 0.0]))  # g_1 + ½g_2 = (½, ½): g_2·x = 0
        array([1. , 0.5])
    """
    from scipy.optimize import nnls  # lazy: scipy is slow to import

    k = len(gram)
    trace = float(np.trace(gram))
    if not trace > 0:
        return np.asarray(u, dtype=np.float64).copy()
    lam, vecs = np.linalg.eigh(gram / trace)
    a = np.sqrt(np.maximum(lam, 0.0))[:, None] * vecs.T
    s, _ = nnls(a, -(a @ u), maxiter=50 * k)
    return u + s


def upgrad(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """UPGrad (Quinton & Rey, 2024): the summed coefficients of the dual-cone projections
    (:func:`dual_cone_weights`) of each ``w_i·g_i``; ``w`` itself when no two gradients conflict.

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> upgrad(g @ g.T, np.array([0.5, 0.5]))  # no conflict: the mean
        array([0.5, 0.5])
    """
    k = len(gram)
    return sum((dual_cone_weights(gram, np.eye(k)[i] * weights[i]) for i in range(k)), np.zeros(k))


def nash_mtl(
    gram: np.ndarray, start: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Nash-MTL (Navon et al., ICML 2022): the ``α > 0`` with ``Mα = 1/α`` (element-wise), the
    ``alpha = 1`` case of :func:`fairgrad`.

    Example:
        >>> import numpy as np
        >>> g = np.array([[2.0, 0.0], [0.0, 0.5]])
        >>> nash_mtl(g @ g.T)  # orthogonal gradients: α_i = 1/‖g_i‖
        array([0.5, 2. ])
    """
    return fairgrad(gram, 1.0, start, max_iter, tol)


def fairgrad(
    gram: np.ndarray,
    alpha: float,
    start: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """FairGrad (Ban & Ji, ICML 2024): the ``w > 0`` with ``Mw = w^{−1/alpha}`` (element-wise).

    ``w`` minimises the strictly convex ``f(w) = ½wᵀMw − Σ_i φ(w_i)`` with ``φ' = w^{−1/alpha}``
    (``φ = log`` for ``alpha = 1``, Nash-MTL). Damped Newton steps (Hessian
    ``M + diag(w^{−1/alpha−1}/alpha)``, backtracking that keeps ``w > 0``) on ``M/‖M‖_F`` (the
    solution for ``M`` is that one times ``‖M‖_F^{−alpha/(1+alpha)}``), from ``start`` or 𝟙,
    until ``max_i |w_i^{1/alpha}(Mw)_i − 1| ≤ tol``; a singular ``M`` (or no convergence) is
    regularised by ``10⁻⁸·I`` and solved again, then the best multiple of 𝟙 is taken. Zeros when
    ``M = 0``.

    Example:
        >>> import numpy as np
        >>> g = np.array([[2.0, 0.0], [0.0, 0.5]])
        >>> fairgrad(g @ g.T, 2.0)  # orthogonal: ‖g_i‖²·w_i = w_i^{-1/2}, w_i = ‖g_i‖^{-4/3}
        array([0.39685026, 2.5198421 ])
    """
    k = len(gram)
    norm = float(np.linalg.norm(gram))
    if not norm > 0:
        return np.zeros(k)
    m = gram / norm
    unit = norm ** (-alpha / (1 + alpha))  # the solution for M is unit × the one for m
    x = np.ones(k) if start is None or not (np.asarray(start) > 0).all() else np.asarray(start)
    for reg in (0.0, 1e-8):
        w = _fair_newton(m + reg * np.eye(k), x / unit, alpha, max_iter, tol)
        if w is not None:
            return w * unit
    return np.ones(k) * _best_multiple(gram, np.ones(k), 1.0 / alpha)


def _best_multiple(m: np.ndarray, x: np.ndarray, p: float) -> float:
    """The ``t > 0`` minimising ``f(t·x)`` of :func:`fairgrad` (``p = 1/alpha``):
    ``t^{1+p} = Σ_i x_i^{1−p} / xᵀmx``; 0 when ``xᵀmx`` is not positive."""
    quad = float(x @ m @ x)
    return (float(np.sum(x ** (1 - p))) / quad) ** (1 / (1 + p)) if quad > 0 else 0.0


def _fair_newton(
    m: np.ndarray, x: np.ndarray, alpha: float, max_iter: int, tol: float
) -> np.ndarray | None:
    """Newton's method on ``f(w) = ½wᵀmw − Σ φ(w)``; ``None`` when it does not converge."""
    p = 1.0 / alpha

    def f(b: np.ndarray) -> float:
        barrier = np.log(b).sum() if p == 1.0 else np.sum(b ** (1 - p)) / (1 - p)
        return 0.5 * float(b @ m @ b) - float(barrier)

    t0 = _best_multiple(m, x, p)
    if not t0 > 0:
        return None
    beta = x * t0
    for _ in range(max_iter):
        mb = m @ beta
        if float(np.max(np.abs(beta**p * mb - 1.0))) <= tol:
            return beta
        grad = mb - beta ** (-p)
        step = np.linalg.solve(m + np.diag(p * beta ** (-p - 1)), -grad)
        t, f0, slope = 1.0, f(beta), float(grad @ step)
        size = float(np.linalg.norm(grad))
        while t > 1e-12:
            trial = beta + t * step
            # Armijo on f, or (near the solution, where f's rounding hides its decrease) a
            # smaller gradient
            if (trial > 0).all() and (
                f(trial) <= f0 + 1e-4 * t * slope
                or float(np.linalg.norm(m @ trial - trial ** (-p))) < 0.5 * size
            ):
                break
            t *= 0.5
        else:
            return None
        beta = trial
    return None


def gradvac_coefficients(
    gram: np.ndarray, targets: np.ndarray, orders: Iterable[list[int]], beta: float
) -> np.ndarray:
    """GradVac (Wang et al., ICLR 2021) as coefficients ``c`` of ``d = Σ_k c_k g_k``, from the
    Gram matrix; updates the EMA targets ``φ̂`` (a ``(K, K)`` array) in place. Each ``g_i'`` gets
    the multiple of ``g_j`` (in the order of ``orders``) that lifts ``cos(g_i', g_j)`` to ``φ̂_ij``
    where it is below; formula in ``docs/balancing.md``.

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> phi = np.zeros((2, 2))  # target 0: like PCGrad, conflicts are projected away
        >>> gradvac_coefficients(g @ g.T, phi, [[1], [0]], 0.5) @ g
        array([0.5, 1.5])
        >>> phi.round(4)  # half-way to cos(g_1, g_2) = -0.7071
        array([[ 0.    , -0.3536],
               [-0.3536,  0.    ]])
    """
    k = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    total = np.zeros(k)
    for i, order in zip(range(k), orders, strict=False):
        c = np.zeros(k)  # g_i' = Σ_k c_k g_k
        c[i] = 1.0
        for j in order:
            if j == i:
                continue
            cg = c @ gram
            norm_i = math.sqrt(max(float(cg @ c), 0.0))
            if norm_i == 0.0 or norms[j] == 0.0:
                continue
            phi = float(cg[j]) / (norm_i * norms[j])
            target = float(targets[i, j])
            if phi < target:
                root_t = math.sqrt(max(1.0 - target * target, 0.0))
                root_p = math.sqrt(max(1.0 - phi * phi, 0.0))
                c[j] += norm_i * (target * root_p - phi * root_t) / (norms[j] * root_t + 1e-300)
            targets[i, j] = (1.0 - beta) * target + beta * phi
        total += c
    return total


def adam_step(state: dict[str, list[float]], key: str, grad: float, lr: float) -> float:
    """One Adam step (betas 0.9, 0.999; eps 1e-8) on a scalar: the amount to subtract from it.
    ``state[key]`` holds its ``[m, v, steps]`` and is updated (the learned balancer weights).

    Example:
        >>> state = {}
        >>> round(adam_step(state, "a", 2.0, lr=0.1), 6), state["a"][2]  # the first step: ±lr
        (0.1, 1.0)
    """
    b1, b2 = 0.9, 0.999
    m, v, n = state.get(key, [0.0, 0.0, 0.0])
    n += 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    state[key] = [m, v, n]
    return lr * (m / (1 - b1**n)) / (math.sqrt(v / (1 - b2**n)) + 1e-8)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto the probability simplex
    ``{x : x ≥ 0, Σ_i x_i = 1}``: ``max(v − θ, 0)`` with the ``θ`` that makes it sum to 1
    (found by sorting, Held, Wolfe & Crowder 1974).

    Example:
        >>> import numpy as np
        >>> project_simplex(np.array([0.5, 1.0, -1.0]))  # θ = 0.25
        array([0.25, 0.75, 0.  ])
    """
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u) - 1.0
    rho = int(np.nonzero(u * np.arange(1, len(v) + 1) > cssv)[0][-1])
    return np.maximum(v - cssv[rho] / (rho + 1), 0.0)


def sdmgrad_weights(
    gram: np.ndarray, w: np.ndarray, lam: float, lr: float, momentum: float, n_iter: int
) -> np.ndarray:
    """SDMGrad's inner solver (Xiao et al., NeurIPS 2023): ``n_iter`` steps of projected SGD
    with momentum (as ``torch.optim.SGD``: ``v ← momentum·v + ∇``, ``w ← Π_Δ(w − lr·v)``) from
    ``w`` on ``½‖G_w + λ·g_0‖²``, whose gradient is ``A(w + λ·𝟙/K)``, ``A`` the Gram matrix divided
    by the squared mean gradient norm ``(mean_i ‖g_i‖)² + 10⁻⁸``. Returns the new ``w``.

    Example:
        >>> import numpy as np
        >>> sdmgrad_weights(np.diag([4.0, 1.0]), np.array([0.5, 0.5]), 0.0, 1.0, 0.5, 1).round(6)
        array([0.166667, 0.833333])
    """
    k = len(gram)
    scale = float(np.mean(np.sqrt(np.maximum(np.diag(gram), 0.0))))
    a = gram / (scale**2 + 1e-8)
    pull = np.full(k, lam / k)
    v = np.zeros(k)
    for i in range(n_iter):
        grad = a @ (w + pull)
        v = grad if i == 0 else momentum * v + grad
        w = project_simplex(w - lr * v)
    return w


def kmeans_1d(x: np.ndarray, groups: int) -> np.ndarray:
    """The optimal k-means partition of the numbers ``x`` into ``min(groups, len(x))`` non-empty
    groups (least within-group sum of squares): group labels ``0, 1, …`` in increasing order.

    In one dimension an optimal group is a run of the sorted values, so dynamic programming over
    the split points finds the global optimum (Wang & Song 2011) in ``O(groups·n²)``, with no
    random initialisation; ties go to the earliest split.

    Example:
        >>> import numpy as np
        >>> kmeans_1d(np.array([2.3, 0.6, 1.2]), 2)  # {0.6, 1.2} and {2.3}
        array([1, 0, 0])
    """
    n = len(x)
    g = min(groups, n)
    order = np.argsort(x, kind="stable")
    s = np.asarray(x, dtype=np.float64)[order]
    c1 = np.concatenate([[0.0], np.cumsum(s)])
    c2 = np.concatenate([[0.0], np.cumsum(s * s)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    count = j - i
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (c2[j] - c2[i]) - (c1[j] - c1[i]) ** 2 / count  # sum of squares of s[i:j]
    cost[count <= 0] = np.inf
    best = cost[0]  # best[j]: the best split of s[:j] into the groups so far
    starts = []
    for _ in range(1, g):
        total = best[:, None] + cost
        start = np.argmin(total, axis=0)
        best = total[start, np.arange(n + 1)]
        starts.append(start)
    labels = np.zeros(n, dtype=np.int64)
    end = n
    for label, start in zip(range(g - 1, 0, -1), reversed(starts), strict=True):
        labels[start[end] : end] = label
        end = int(start[end])
    out = np.empty(n, dtype=np.int64)
    out[order] = labels
    return out
