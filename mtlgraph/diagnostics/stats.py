"""The statistics of the interference probes: pair statistics, task affinity, task grouping.
Pure functions on numbers; formulas in ``docs/diagnostics.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch

EXHAUSTIVE_MAX_TASKS = 8
"""Up to this many tasks :func:`suggest_groups` tries every partition (4,140 for 8 tasks)."""
SIGNIFICANCE = 2.0
"""A mean counts as non-zero when it is this many standard errors away from 0 (about 95%)."""

_Matrix = list[list[float]]


def pair_statistics(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and norm ratios of every pair of gradients from their Gram matrix.

    Args:
        gram: ``(K, K)`` with ``gram[a, b] = g_a·g_b``.

    Returns:
        ``(cosine, ratio)``, both ``(K, K)`` float64: ``cosine[a, b] = g_a·g_b / (‖g_a‖‖g_b‖)``
        and ``ratio[a, b] = ‖g_a‖/‖g_b‖``; NaN where a norm is zero.

    Example:
        >>> import torch
        >>> from mtlgraph.diagnostics import pair_statistics
        >>> g = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
        >>> cos, ratio = pair_statistics(g @ g.T)
        >>> cos[0].tolist(), ratio[0].tolist()
        ([1.0, -1.0, 0.0], [1.0, 0.5, 0.3333333333333333])
    """
    g = gram.detach().double()
    norms = g.diagonal().clamp(min=0).sqrt()
    zero = norms == 0
    safe = torch.where(zero, torch.ones_like(norms), norms)
    cosine = g / safe[:, None] / safe[None, :]
    ratio = norms[:, None] / safe[None, :]
    bad = zero[:, None] | zero[None, :]
    nan = torch.full_like(cosine, math.nan)
    return torch.where(bad, nan, cosine.clamp(-1.0, 1.0)), torch.where(bad, nan, ratio)


def lookahead_affinity(before: float, after: float) -> float:
    """``Z = 1 − L_after / L_before`` (Fifty et al. 2021); NaN when ``before`` is not positive.

    Example:
        >>> from mtlgraph.diagnostics import lookahead_affinity
        >>> lookahead_affinity(2.0, 1.5), lookahead_affinity(2.0, 2.5)
        (0.25, -0.25)
    """
    if not (before > 0 and math.isfinite(before) and math.isfinite(after)):
        return math.nan
    return 1.0 - after / before


def mean_and_error(n: int, total: float, squares: float) -> tuple[float, float]:
    """Mean and standard error of ``n`` values from their sum and sum of squares (error ``inf``
    for fewer than two values, NaN mean for none).

    Example:
        >>> from mtlgraph.diagnostics import mean_and_error
        >>> mean_and_error(4, 2.0, 1.5)  # values 0, 0.5, 0.5, 1: sd 0.408, error 0.204
        (0.5, 0.2041241452319315)
    """
    if n == 0:
        return math.nan, math.inf
    mean = total / n
    if n < 2:
        return mean, math.inf
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return mean, math.sqrt(variance / n)


def mutual_affinity(
    matrix: Sequence[Sequence[float]],
    i: int,
    j: int,
    errors: Sequence[Sequence[float]] | None = None,
) -> tuple[float, float]:
    """``Z_{i→j} + Z_{j→i}`` and its standard error (the measured one alone when the other is
    NaN; NaN when neither is; error ``inf`` without ``errors``)."""
    both = [(i, j), (j, i)]
    measured = [(a, b) for a, b in both if not math.isnan(matrix[a][b])]
    if not measured:
        return math.nan, math.inf
    value = sum(matrix[a][b] for a, b in measured)
    if errors is None:
        return value, math.inf
    return value, math.sqrt(sum(errors[a][b] ** 2 for a, b in measured))


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every set partition of ``items`` (restricted growth order: fewest groups first within a
    branch)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1 :]]


def suggest_groups(
    tasks: Sequence[str],
    matrix: Sequence[Sequence[float]],
    errors: Sequence[Sequence[float]] | None = None,
) -> tuple[list[list[str]], str]:
    """Group tasks into trunks from their affinity matrix.

    Maximises the within-group mutual affinity, never grouping negatively related tasks
    (objective and ties: ``docs/diagnostics.md``); exhaustive up to :data:`EXHAUSTIVE_MAX_TASKS`.

    Args:
        tasks: Task names, in the matrix's order.
        matrix: ``matrix[i][j] = Z_{i→j}`` (NaN where never measured).
        errors: Standard errors of the entries of ``matrix`` (``None``: exact values).

    Returns:
        ``(groups, method)``: groups of task names (each in ``tasks`` order; groups ordered by
        their first task) and ``"exhaustive"`` or ``"greedy"``.

    Example:
        >>> from mtlgraph.diagnostics import suggest_groups
        >>> nan = float("nan")
        >>> z = [[nan, 0.2, -0.3], [0.1, nan, 0.0], [-0.2, 0.05, nan]]
        >>> suggest_groups(["a", "b", "c"], z)
        ([['a', 'b'], ['c']], 'exhaustive')
    """
    k = len(tasks)
    mutual, raw = _mutual_matrices(matrix, errors)

    def allowed(group: Sequence[int]) -> bool:
        return all(mutual[i][j] >= 0 for i, j in itertools.combinations(group, 2))

    if k <= EXHAUSTIVE_MAX_TASKS:
        best, method = _exhaustive(k, mutual, raw, allowed), "exhaustive"
    else:
        best, method = _greedy(k, mutual, raw, allowed), "greedy"
    groups = sorted((sorted(g) for g in best), key=lambda g: g[0])
    return [[tasks[i] for i in g] for g in groups], method


def _mutual_matrices(
    matrix: Sequence[Sequence[float]], errors: Sequence[Sequence[float]] | None
) -> tuple[_Matrix, _Matrix]:
    """``(mutual, raw)``: the significant mutual affinities (else 0) and all measured ones
    (to break ties), both symmetric."""
    k = len(matrix)
    mutual = [[0.0] * k for _ in range(k)]
    raw = [[0.0] * k for _ in range(k)]
    for i, j in itertools.combinations(range(k), 2):
        m, error = mutual_affinity(matrix, i, j, errors)
        if errors is None:
            error = 0.0
        if not math.isnan(m):
            raw[i][j] = raw[j][i] = m
            if abs(m) > SIGNIFICANCE * error:
                mutual[i][j] = mutual[j][i] = m
    return mutual, raw


def _exhaustive(
    k: int, mutual: _Matrix, raw: _Matrix, allowed: Callable[[Sequence[int]], bool]
) -> list[list[int]]:
    """The best allowed partition of ``0..k-1``, trying every one."""

    def key(partition: list[list[int]]) -> tuple[float, int, float]:
        pairs = [p for g in partition for p in itertools.combinations(g, 2)]
        return (
            sum(mutual[i][j] for i, j in pairs),
            -len(partition),
            sum(raw[i][j] for i, j in pairs),
        )

    best: list[list[int]] = [[i] for i in range(k)]
    best_key = key(best)
    for partition in _partitions(list(range(k))):
        if not all(allowed(g) for g in partition):
            continue
        candidate = key(partition)
        if candidate > best_key:
            best, best_key = partition, candidate
    return best


def _greedy(
    k: int, mutual: _Matrix, raw: _Matrix, allowed: Callable[[Sequence[int]], bool]
) -> list[list[int]]:
    """Singletons merged pairwise, the largest gain first, while an allowed merge remains."""
    best = [[i] for i in range(k)]
    while True:
        merge: tuple[tuple[float, float], int, int] | None = None
        for x, y in itertools.combinations(range(len(best)), 2):
            if not allowed(best[x] + best[y]):
                continue
            cross = [(i, j) for i in best[x] for j in best[y]]
            gain = (sum(mutual[i][j] for i, j in cross), sum(raw[i][j] for i, j in cross))
            if merge is None or gain > merge[0]:
                merge = (gain, x, y)
        if merge is None:
            return best
        _, x, y = merge
        best[x] = best[x] + best[y]
        del best[y]
