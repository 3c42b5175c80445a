"""Numeric solvers of the gradient-based balancers, on the Gram matrix of per-task gradients.

All of them work on ``M_ij = g_i·g_j`` (a ``(K, K)`` float64 array), never on the gradients
themselves, so their cost does not depend on the model's size:

- :func:`pcgrad_coefficients`: PCGrad's projections, as coefficients of the ``g_i``;
- :func:`min_norm`: the min-norm point of the convex hull (MGDA), closed form for two tasks,
  pairwise Frank–Wolfe beyond;
- :func:`cagrad_solve` with its exact line search :func:`line_min`: CAGrad's inner problem.
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
