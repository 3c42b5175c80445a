"""Regression heads and task weights: the sin/cos guide.

One input ``x``, two regression targets ``sin(x)`` and ``cos(x)``; a shared fully connected trunk
and one linear head per target, each trained with MSE. One dataset labels both tasks, so every
batch trains both heads. The guide's question is how the two losses should add up:

- **equal weights**: ``L = L_sin + L_cos`` (the ``sum`` balancer, ``Task.weight = 1``);
- **static weights**: ``L = 1.0 · L_sin + 0.5 · L_cos`` (``Task(weight=0.5)``): task importance;
- **dynamic weights**: after each validation, ``w_i ∝ 1 / m_i`` for the task's validation
  metric ``m_i`` (R² here, higher is better), renormalised so ``Σ w_i = K`` — the
  ``inverse_metric`` balancer: the task doing worse gets more weight until the next evaluation.

The script prints a plot-free table of the test errors and the final weights. On this easy,
well-scaled pair all three reach a small error; the table is the honest comparison (which
weighting wins depends on the seed and on how hard the tasks are relative to each other).

Run: ``python tutorials/03_sin_cos_regression.py``
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.data.synthetic import make_sin_cos_dataset

VARIANTS: dict[str, dict[str, Any]] = {
    "equal weights": {"weights": {"sin": 1.0, "cos": 1.0}, "balancer": "sum"},
    "static weights": {"weights": {"sin": 1.0, "cos": 0.5}, "balancer": "sum"},
    "dynamic weights": {"weights": {"sin": 1.0, "cos": 1.0}, "balancer": "inverse_metric"},
}


def build_model(weights: dict[str, float], width: int, seed: int) -> MultitaskClassifier:
    """A shared tanh MLP trunk and one linear head per target."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
    tasks = [
        Task(
            name=f"{target}_task",
            module_pool=nn.ModuleDict({"trunk": trunk, f"{target}_head": nn.Linear(width, 1)}),
            op_sequence=[
                Operation("trunk", [("_input_", "x")]),  # same module, same input: runs once
                Operation(f"{target}_head", ["trunk"]),
            ],
            task_type="regression",  # MSE loss, identity output, metrics mse / mae / r2
            weight=weights[target],
        )
        for target in ("sin", "cos")
    ]
    return MultitaskClassifier(tasks)


def main(n: int = 2000, n_epochs: int = 30, width: int = 64, seed: int = 0) -> dict[str, Any]:
    """Train the three variants on the same data; return test errors and final weights."""
    loaders = []
    for split, (x, sin, cos) in zip(
        ("train", "valid", "test"), make_sin_cos_dataset(n, seed=seed), strict=True
    ):
        dataset = DictDataset(
            "waves",
            split,
            {"x": torch.from_numpy(x)},
            {"sin_task": torch.from_numpy(sin), "cos_task": torch.from_numpy(cos)},
        )
        loaders.append(DictDataLoader(dataset, batch_size=32, shuffle=split == "train", seed=seed))
    results: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        model = build_model(variant["weights"], width, seed)
        trainer = Trainer(
            n_epochs=n_epochs,
            lr=0.005,
            lr_scheduler="cosine",
            warmup_steps=50,
            balancer=variant["balancer"],
            progress_bar=False,
            seed=seed,
        )
        trainer.fit(model, loaders)
        scores = model.score(loaders[2])
        weights = {
            t: [r[f"model/all/train/weight/{t}_task"] for r in trainer.history]
            for t in ("sin", "cos")
        }
        results[name] = {
            "sin_mse": scores["sin_task/waves/test/mse"],
            "cos_mse": scores["cos_task/waves/test/mse"],
            "weights": {t: w[-1] for t, w in weights.items()},
            "cos_weight_range": (min(weights["cos"]), max(weights["cos"])),
        }
    return results


def report(results: dict[str, Any]) -> str:
    lines = ["variant            test MSE sin   test MSE cos   final weights   cos weight range"]
    for name, r in results.items():
        w, (lo, hi) = r["weights"], r["cos_weight_range"]
        lines.append(
            f"{name:<18} {r['sin_mse']:12.5f}   {r['cos_mse']:12.5f}   "
            f"({w['sin']:.2f}, {w['cos']:.2f})    {lo:.2f} .. {hi:.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(report(main(n=args.n, n_epochs=args.epochs, seed=args.seed)))
