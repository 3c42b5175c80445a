"""The seed tutorial's ``utils`` module (Snorkel's tutorial ships its own): toy 2-D datasets,
each split 80/10/10 into train, valid and test as ``(X, Y)`` numpy pairs."""

from __future__ import annotations

import numpy as np


def _splits(X: np.ndarray, Y: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    n = len(X)
    a, b = int(0.8 * n), int(0.9 * n)
    return (X[:a], Y[:a]), (X[a:b], Y[a:b]), (X[b:], Y[b:])


def _points(n: int, r: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.5 * r, 1.5 * r, size=(n, 2)).astype(np.float32)


def make_circle_dataset(n: int, r: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Label 1 inside the circle of radius ``r`` around the origin."""
    X = _points(n, r, 0)
    return _splits(X, (np.linalg.norm(X, axis=1) < r).astype(np.int64))


def make_square_dataset(n: int, r: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Label 1 inside the square of half-width ``r`` around the origin."""
    X = _points(n, r, 1)
    return _splits(X, (np.abs(X).max(axis=1) < r).astype(np.int64))


def make_inv_circle_dataset(n: int, r: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Label 1 outside the circle of radius ``r``."""
    X = _points(n, r, 2)
    return _splits(X, (np.linalg.norm(X, axis=1) >= r).astype(np.int64))
