"""Helpers of the bad-input corpus: one tiny model and loaders to break, one way at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task

N = 32


def tiny_task(
    name: str = "t", outputs: int = 3, task_type: str = "multiclass", **kwargs: Any
) -> Task:
    """A linear head on input field ``x`` (2 features) with ``outputs`` outputs."""
    torch.manual_seed(0)
    return Task(
        name,
        {f"{name}_head": nn.Linear(2, outputs)},
        [Operation(f"{name}_head", [("_input_", "x")])],
        task_type=task_type,  # type: ignore[arg-type]
        **kwargs,
    )


def tiny_model(**task: Any) -> MultitaskClassifier:
    return MultitaskClassifier([tiny_task(**task)])


def loaders(
    y: Any,
    x: Any = None,
    task: str = "t",
    splits: tuple[str, ...] = ("train", "valid"),
    batch_size: int = 8,
) -> list[DictDataLoader]:
    """Loaders of dataset ``d`` for ``splits``, each with the same ``x`` and labels ``y``."""
    x = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(0)) if x is None else x
    return [
        DictDataLoader(DictDataset("d", s, {"x": x}, {task: y}), batch_size=batch_size)
        for s in splits
    ]


def class_labels(n: int = N, classes: int = 3) -> torch.Tensor:
    return torch.arange(n) % classes


def params_of(module: nn.Module) -> list[torch.Tensor]:
    """Copies of a module's parameters (to assert a refused operation changed nothing)."""
    return [p.detach().clone() for p in module.parameters()]
