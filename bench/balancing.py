"""Per-step cost of each balancer relative to ``sum``, on a 4-task model, in one run.

The model: a shared MLP trunk and four heads (two classification, two regression); one dataset
labels all four tasks, so every step holds K = 4 tasks (what the gradient methods need). Each
balancer trains the same initial model for the same steps; the fits are repeated in rotation
(so machine noise hits every balancer alike) and the median seconds per step are compared with
``sum``'s.

Each optimizer step (forward, balancer, backward, optimizer) is timed on its own and the median
over all steps of all repeats is compared: on a shared machine that median ignores the moments
other jobs hold the core, which the time of a whole fit does not. One torch thread.

Two sizes: ``small`` (a tiny trunk, batch 32: Python overhead dominates) and ``medium`` (a
256-wide trunk, batch 256: arithmetic dominates).

Targets (docs/balancing.md, DESIGN.md): a gradient method costs <= K x a ``sum`` step (it does
one backward pass per task through the shared trunk); a loss-based method <= 1.1 x.

Run: ``python bench/balancing.py [--repeats 5] [--steps 100] [--sizes small medium]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import ClassVar
from unittest import mock

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.training import trainer as trainer_module
from mtlgraph.training.step import TrainStep

BALANCERS: list[tuple[str, str | dict[str, object], str]] = [
    # (label, spec, family)
    ("sum", "sum", "loss"),
    ("uncertainty", "uncertainty", "loss"),
    ("dwa", "dwa", "loss"),
    ("inverse_metric", "inverse_metric", "loss"),
    ("rlw", "rlw", "loss"),
    ("gradnorm", "gradnorm", "gradnorm"),
    ("pcgrad", "pcgrad", "gradient"),
    ("cagrad", "cagrad", "gradient"),
    ("mgda", "mgda", "gradient"),
]
SIZES = {
    # name: (input dim, trunk width, batch size)
    "small": (8, 16, 32),
    "medium": (64, 256, 256),
}
TASKS = [("c0", "multiclass"), ("c1", "multiclass"), ("r0", "regression"), ("r1", "regression")]


def build(size: str) -> MultitaskClassifier:
    in_dim, width, _ = SIZES[size]
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    tasks = [
        Task(
            name,
            {"trunk": trunk, f"{name}_head": nn.Linear(width, 2 if kind == "multiclass" else 1)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{name}_head", ["trunk"])],
            task_type=kind,  # type: ignore[arg-type]
        )
        for name, kind in TASKS
    ]
    return MultitaskClassifier(tasks)


def loader(size: str, steps: int) -> DictDataLoader:
    in_dim, _, batch = SIZES[size]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch * steps, in_dim, generator=g)
    labels = {
        "c0": (x[:, 0] > 0).long(),
        "c1": (x[:, 1] * x[:, 2] > 0).long(),
        "r0": x[:, 3] - x[:, 4],
        "r1": 10 * torch.sin(x[:, 5]),
    }
    return DictDataLoader(DictDataset("d", "train", {"x": x}, labels), batch_size=batch)


class TimedStep(TrainStep):
    """The run's step, recording the duration of each call (one micro-step) in ``SECONDS``."""

    seconds: ClassVar[list[float]] = []

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = super().__call__(*args, **kwargs)
        TimedStep.seconds.append(time.perf_counter() - start)
        return out


def step_seconds(
    model: MultitaskClassifier, train: DictDataLoader, spec: str | dict[str, object]
) -> list[float]:
    """Seconds of each optimizer step of one epoch from a copy of ``model``."""
    model = copy.deepcopy(model)
    trainer = Trainer(
        n_epochs=1, lr=1e-3, balancer=spec, progress_bar=False, evaluation_freq=0, seed=0
    )
    TimedStep.seconds = []
    # the loop builds its step from this module attribute: swap in the timed one for this fit
    with mock.patch.object(trainer_module, "TrainStep", TimedStep):
        trainer.fit(model, [train])
    return list(TimedStep.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description="mtlgraph balancer cost benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per fit")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = len(TASKS)
    for size in args.sizes:
        model, train = build(size), loader(size, args.steps)
        for _, spec, _ in BALANCERS:  # warm-up: plans, allocator, first-call costs
            step_seconds(model, train, spec)
        times: dict[str, list[float]] = {label: [] for label, _, _ in BALANCERS}
        for _ in range(args.repeats):
            for label, spec, _ in BALANCERS:
                times[label] += step_seconds(model, train, spec)
        base = statistics.median(times["sum"])
        in_dim, width, batch = SIZES[size]
        print(
            f"{size}: trunk {in_dim}->{width}->{width}, batch {batch}, {k} tasks per step, "
            f"sum step {base * 1e6:.0f}us (median of {len(times['sum'])} steps)"
        )
        for label, _, family in BALANCERS:
            ratio = statistics.median(times[label]) / base
            target = k if family in ("gradient", "gradnorm") else 1.1
            flag = "ok" if ratio <= target else "OVER"
            print(f"  {label:15s} {ratio:5.2f} x sum   (target <= {target:g})  {flag}")


if __name__ == "__main__":
    main()
