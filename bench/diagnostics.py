"""Extra cost of the interference diagnostics: a fit with probes every K steps vs a plain fit.

Two workloads, each trained from the same initial weights on the same batches, with and without
``TrainerConfig.diagnostics``, in rotation (so machine noise hits both alike); the medians of the
whole-fit times are compared. The final weights are checked for bit-identity: a probe must not
change training.

- ``tutorial``: the seed tutorial's three tasks (circle, square, inv_circle) on a shared tiny MLP,
  one dataset each, batch 32, 10 epochs (750 steps). Python overhead dominates its steps, so it
  is the worst case for a probe's relative cost.
- ``products``: tutorial 02's three tasks (digit, loop, price) on a shared image trunk and a
  shared text trunk, batch 32, 10 epochs (360 steps).

A probe costs one forward pass over one batch per training loader, one backward pass per task
through the shared modules and, with ``affinity``, one more forward pass per task; every K steps.
Whole fits on a shared machine are noisy (other jobs take the cores for a while), so the script
prints the ratio of the medians, the ratio of the fastest fits, and the ratio implied by the
probes timed on their own (median of 100), ``1 + probe / (K x plain step)``; the last is the
steadiest and sets the verdict.

Target: <= 1.2 x a plain fit at K = 50. One torch thread.

Run: ``python bench/diagnostics.py [--repeats 7] [--every 50]`` (about a minute).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.data.synthetic import (
    make_circle_dataset,
    make_inv_circle_dataset,
    make_square_dataset,
)
from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor

ROOT = Path(__file__).resolve().parents[1]


def tutorial_workload() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """The seed tutorial: three tasks, a shared ``base_mlp``, one dataset each."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    makers = {
        "circle": make_circle_dataset,
        "square": make_square_dataset,
        "inv_circle": make_inv_circle_dataset,
    }
    tasks, loaders = [], []
    for name, make in makers.items():
        tasks.append(
            Task(
                f"{name}_task",
                {"base_mlp": trunk, f"{name}_head": nn.Linear(4, 2)},
                [
                    Operation("base_mlp", [("_input_", f"{name}_data")]),
                    Operation(f"{name}_head", ["base_mlp"]),
                ],
            )
        )
        (X, Y), _, _ = make(1000, 1.0)
        dataset = DictDataset(
            f"{name}Dataset",
            "train",
            {f"{name}_data": torch.from_numpy(X)},
            {f"{name}_task": torch.from_numpy(Y)},
        )
        loaders.append(DictDataLoader(dataset, batch_size=32, shuffle=True))
    return MultitaskClassifier(tasks), loaders


def products_workload() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """Tutorial 02's step 3: digit, loop and price tasks on one shared image trunk."""
    spec = importlib.util.spec_from_file_location(
        "tutorial_02", ROOT / "tutorials" / "02_multi_dataset_ensembles.py"
    )
    assert spec is not None and spec.loader is not None
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    names = list(tutorial.TASKS)
    loaders = tutorial.make_loaders(None, 0)
    train = [dl for t in names for dl in loaders[t] if dl.dataset.split == "train"]
    return tutorial.build_model(names, None, 0), train


def fit(
    model: MultitaskClassifier, loaders: list[DictDataLoader], diagnostics: dict[str, Any] | None
) -> tuple[float, MultitaskClassifier, int]:
    """Seconds of a 10-epoch fit of a copy of ``model``, the trained copy, and its steps."""
    model = copy.deepcopy(model)
    trainer = Trainer(
        n_epochs=10, lr=0.01, progress_bar=False, evaluation_freq=0, diagnostics=diagnostics
    )
    start = time.perf_counter()
    trainer.fit(model, loaders)
    return time.perf_counter() - start, model, trainer.global_step


def probe_seconds(
    model: MultitaskClassifier, loaders: list[DictDataLoader], affinity: bool, n: int = 100
) -> float:
    """Median seconds of one probe (on the initial weights; a probe changes nothing)."""
    monitor = InterferenceMonitor(DiagnosticsConfig(every=1, affinity=affinity))
    groups = [{"params": list(model.parameters()), "lr": 0.01}]
    times = []
    for step in range(n + 10):
        start = time.perf_counter()
        monitor.probe(model, loaders, groups, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])  # after a warm-up


def compare(
    workload: Callable[[], tuple[MultitaskClassifier, list[DictDataLoader]]],
    every: int,
    repeats: int,
) -> dict[str, Any]:
    model, loaders = workload()
    variants: dict[str, dict[str, Any] | None] = {
        "plain": None,
        "cosine only": {"every": every, "affinity": False},
        "cosine + affinity": {"every": every},
    }
    for spec in variants.values():  # warm-up: plans, layouts, allocator
        fit(model, loaders, spec)
    times: dict[str, list[float]] = {name: [] for name in variants}
    identical = True
    steps = 0
    for _ in range(repeats):
        weights = []
        for name, spec in variants.items():
            seconds, trained, steps = fit(model, loaders, spec)
            times[name].append(seconds)
            weights.append(list(trained.parameters()))
        identical &= all(
            torch.equal(a, b) for w in weights[1:] for a, b in zip(weights[0], w, strict=True)
        )
    medians = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    step = medians["plain"] / steps
    implied = {
        "cosine only": 1 + probe_seconds(model, loaders, False) / (every * step),
        "cosine + affinity": 1 + probe_seconds(model, loaders, True) / (every * step),
    }
    return {
        "medians": medians,
        "fastest": fastest,
        "implied": implied,
        "identical": identical,
        "step": step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="mtlgraph diagnostics cost benchmark")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--every", type=int, default=50, help="optimizer steps between probes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, workload in (("tutorial", tutorial_workload), ("products", products_workload)):
        result = compare(workload, args.every, args.repeats)
        plain = result["medians"]["plain"]
        print(
            f"{name}: plain fit {plain:.3f}s (median of {args.repeats}, "
            f"{result['step'] * 1e3:.2f} ms a step); probes every {args.every} steps; "
            f"identical weights: {result['identical']}"
        )
        for variant, seconds in result["medians"].items():
            if variant == "plain":
                continue
            ratio = seconds / plain
            fastest = result["fastest"][variant] / result["fastest"]["plain"]
            implied = result["implied"][variant]
            flag = "ok" if implied <= 1.2 else "OVER"
            print(
                f"  {variant:18s} {seconds:.3f}s  ratio: medians {ratio:.3f}, fastest fits "
                f"{fastest:.3f}, implied by the probe time {implied:.3f} (target <= 1.2)  {flag}"
            )


if __name__ == "__main__":
    main()
