"""Evidence on generated data that the balancers fix the failures they are for.

(a) Loss scale: two regression tasks whose targets differ in scale by 100x. With ``sum`` the
    large task's gradients own the shared trunk and the small task learns poorly; ``uncertainty``
    and ``gradnorm`` (and ``cagrad``) bring both to a good normalised error (1 - R²).
(b) Conflict: two tasks read one shared trunk output at their own fixed gain, with targets at an
    obtuse angle, so their gradients on the trunk conflict. ``pcgrad``, ``cagrad`` and ``mgda``
    give update directions that conflict less with each task than ``sum``'s do (measured on the
    same gradients), and end with a better error on the task ``sum`` serves worst.

Fixed seeds; the margins are wide (see the numbers in the comments, measured on CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.balancing import BALANCERS, Balancer, GradientBalancer

pytestmark = pytest.mark.slow


def normalised_errors(
    model: MultitaskClassifier, loaders: list[DictDataLoader], balancer: object, **config: object
) -> tuple[dict[str, float], Balancer]:
    trainer = Trainer(balancer=balancer, progress_bar=False, evaluation_freq=0, **config)
    trainer.fit(model, loaders)
    record = trainer.history[-1]
    return {t: 1 - record[f"{t}/d/valid/r2"] for t in model.tasks}, trainer.balancer


def split_loaders(x: torch.Tensor, labels: dict[str, torch.Tensor]) -> list[DictDataLoader]:
    return [
        DictDataLoader(
            DictDataset("d", split, {"x": x[rows]}, {t: y[rows] for t, y in labels.items()}),
            batch_size=32,
            shuffle=split == "train",
        )
        for split, rows in (("train", slice(0, 512)), ("valid", slice(512, None)))
    ]


# ---------------------------------------------------------------------- (a) loss scale


def scale_problem(seed: int) -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """y_big = 100·(x·w1) + noise, y_small = x·w2 + noise, w1 ⟂ w2, on a 2-unit linear trunk.

    The trunk must learn both directions; under ``sum`` the big task's (noisy) gradients are
    ~100x larger and Adam's step on the trunk is all theirs.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(768, 10, generator=g)
    w = torch.linalg.qr(torch.randn(10, 2, generator=g))[0]
    labels = {
        "big": 100 * (x @ w[:, 0] + 0.2 * torch.randn(768, generator=g)),
        "small": x @ w[:, 1] + 0.2 * torch.randn(768, generator=g),
    }
    torch.manual_seed(seed)
    trunk = nn.Linear(10, 2)
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_head": nn.Linear(2, 1)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            task_type="regression",
        )
        for t in ("big", "small")
    ]
    return MultitaskClassifier(tasks), split_loaders(x, labels)


# Measured normalised errors (big, small) for seeds 1 and 4:
#   sum          (0.032, 1.001)  (0.036, 0.965)
#   uncertainty  (0.032, 0.047)  (0.036, 0.051)   lr 0.1 for the log-variances
#   gradnorm     (0.040, 0.036)  (0.047, 0.062)
#   cagrad       (0.032, 0.037)  (0.036, 0.061)
SCALE_METHODS = [
    {"name": "uncertainty", "lr": 0.1},  # s_i must travel ~log(100²) ≈ 9: a faster lr
    "gradnorm",
    "cagrad",
]


@pytest.mark.parametrize("seed", [1, 4])
def test_loss_scale_sum_fails_the_small_task_and_balancers_fix_it(seed: int) -> None:
    config = {"n_epochs": 30, "lr": 0.05, "seed": seed}
    errors, _ = normalised_errors(*scale_problem(seed), "sum", **config)
    assert errors["big"] < 0.1 and errors["small"] > 0.5  # the small task learns poorly
    for method in SCALE_METHODS:
        balanced, balancer = normalised_errors(*scale_problem(seed), method, **config)
        assert balanced["big"] < 0.1, (method, balanced)
        assert balanced["small"] < 0.15, (method, balanced)
        assert balanced["small"] < errors["small"] / 5
        if balancer.name != "cagrad":  # the loss weights moved toward the small task
            weights = balancer.weights()
            assert weights["small"] > 10 * weights["big"], (method, weights)


# ---------------------------------------------------------------------- (b) conflict


class Gain(nn.Module):
    """A task's readout of the shared value: a fixed gain and a learnable bias."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gain * z + self.bias


class RecordingSum(GradientBalancer):
    """``sum`` computed through the gradient machinery, recording each step's Gram matrix."""

    name = "recording_sum"

    def __init__(self) -> None:
        super().__init__()
        self.grams: list[np.ndarray] = []

    def combine(self, gram: np.ndarray) -> np.ndarray:
        self.grams.append(gram.copy())
        return np.ones(len(gram))


def conflict_problem(seed: int) -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """y_a = x·w_a, y_b = 0.3·(x·w_b) with cos(w_a, w_b) = -0.6, read from one shared scalar."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(768, 8, generator=g)
    q = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
    w_a = q[:, 0]
    w_b = -0.6 * q[:, 0] + 0.8 * q[:, 1]
    labels = {
        "a": x @ w_a + 0.1 * torch.randn(768, generator=g),
        "b": 0.3 * (x @ w_b + 0.1 * torch.randn(768, generator=g)),
    }
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_head": Gain(gain)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            task_type="regression",
        )
        for t, gain in (("a", 1.0), ("b", 0.3))
    ]
    return MultitaskClassifier(tasks), split_loaders(x, labels)


def worst_cosine(gram: np.ndarray, beta: np.ndarray) -> float:
    """min_i cos(g_i, d) for d = Σ β_j g_j, from the Gram matrix."""
    dots = gram @ beta
    return float(np.min(dots / np.sqrt(np.diag(gram) * max(beta @ gram @ beta, 1e-30))))


CONFLICT_METHODS: list[str | dict[str, object]] = ["pcgrad", "mgda", {"name": "cagrad", "c": 0.9}]


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_methods_reduce_conflict_and_help_the_worse_task(seed: int) -> None:
    config = {"n_epochs": 20, "lr": 0.01, "seed": seed}
    recorder = RecordingSum()
    errors, _ = normalised_errors(*conflict_problem(seed), recorder, **config)
    # Under sum, task b (the smaller gain) is served badly: worse than predicting its mean.
    # Measured (a, b): seed 0 (0.037, 2.664), seed 1 (0.043, 2.740).
    assert errors["a"] < 0.1 and errors["b"] > 2.0
    sum_cos = np.array([worst_cosine(m, np.ones(2)) for m in recorder.grams])
    conflicting = sum_cos < 0  # steps where sum raises one task's loss (to first order)
    # Measured: 71% / 72% of sum's steps, with a mean worst cosine of -0.41 / -0.37 on them.
    assert conflicting.mean() > 0.5 and sum_cos[conflicting].mean() < -0.3

    # On the same gradients every method's direction conflicts on <= 1% of the steps and its
    # worst cosine averages +0.15 on sum's conflicting steps. Trained with each method, task b
    # ends at: pcgrad 0.98 / 1.55, mgda 0.16 / 0.39, cagrad (c = 0.9) 2.13 / 2.24.
    for method in CONFLICT_METHODS:
        combine = BALANCERS.build(method).combine  # type: ignore[attr-defined]
        cos = np.array([worst_cosine(m, combine(m)) for m in recorder.grams])
        assert (cos < 0).mean() < 0.05, method
        assert cos[conflicting].mean() > 0.1, method
        if method in ("pcgrad", "mgda"):  # with two tasks no task's loss rises (first order)
            assert (cos > -1e-6).all(), method
        balanced, _ = normalised_errors(*conflict_problem(seed), method, **config)
        assert balanced["b"] < errors["b"] - 0.25, (method, balanced)
        assert max(balanced.values()) < max(errors.values()), (method, balanced)


def test_the_conflict_problem_is_a_real_trade_off() -> None:
    """At sum's optimum the two tasks' trunk gradients point (nearly) in opposite directions."""
    recorder = RecordingSum()
    normalised_errors(*conflict_problem(0), recorder, n_epochs=20, lr=0.01, seed=0)
    last = recorder.grams[-16:]  # the last epoch
    cosines = [m[0, 1] / math.sqrt(m[0, 0] * m[1, 1]) for m in last]
    assert float(np.mean(cosines)) < -0.5
