"""Generated datasets for tutorials, tests, benchmarks and configs (nothing is downloaded).

Every generator takes a ``seed`` and uses its own ``numpy.random.Generator``; each returns the
``(train, valid, test)`` splits as ``(X, Y)`` numpy pairs, split 80/10/10 by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Split = tuple[np.ndarray, np.ndarray]


def _split(X: np.ndarray, Y: np.ndarray, fractions: Sequence[float]) -> tuple[Split, Split, Split]:
    n = len(X)
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return (X[:a], Y[:a]), (X[a:b], Y[a:b]), (X[b:], Y[b:])


def _points(n: int, R: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform in the square of half-width ``1.5 * R`` centred on the origin."""
    return rng.uniform(-1.5 * R, 1.5 * R, size=(n, 2)).astype(np.float32)


def make_circle_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[Split, Split, Split]:
    """2-D points labelled 1 when inside the circle of radius ``R`` centred on the origin.

    Example:
        >>> from mtlgraph.synthetic import make_circle_dataset
        >>> (X, Y), valid, test = make_circle_dataset(1000, 1.0)
        >>> X.shape, sorted(set(Y.tolist()))
        ((800, 2), [0, 1])
    """
    rng = np.random.default_rng([seed, 1])
    X = _points(n, R, rng)
    Y = (np.linalg.norm(X, axis=1) < R).astype(np.int64)
    return _split(X, Y, fractions)


def make_inv_circle_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[Split, Split, Split]:
    """Like :func:`make_circle_dataset` (other points) with flipped labels: 1 means outside."""
    rng = np.random.default_rng([seed, 2])
    X = _points(n, R, rng)
    Y = (np.linalg.norm(X, axis=1) >= R).astype(np.int64)
    return _split(X, Y, fractions)


def make_square_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[Split, Split, Split]:
    """2-D points labelled 1 when inside the axis-aligned square of half-width ``R``."""
    rng = np.random.default_rng([seed, 3])
    X = _points(n, R, rng)
    Y = (np.abs(X).max(axis=1) < R).astype(np.int64)
    return _split(X, Y, fractions)


def make_sin_cos_dataset(
    n: int,
    low: float = -np.pi,
    high: float = np.pi,
    noise: float = 0.0,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Inputs ``x`` uniform in ``[low, high]`` with targets ``sin(x)`` and ``cos(x)``.

    Returns:
        ``(train, valid, test)``, each ``(x (N, 1), sin (N,), cos (N,))`` as float32.
    """
    rng = np.random.default_rng([seed, 4])
    x = rng.uniform(low, high, size=(n, 1)).astype(np.float32)
    s = (np.sin(x[:, 0]) + noise * rng.standard_normal(n)).astype(np.float32)
    c = (np.cos(x[:, 0]) + noise * rng.standard_normal(n)).astype(np.float32)
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return tuple((x[i:j], s[i:j], c[i:j]) for i, j in ((0, a), (a, b), (b, n)))
