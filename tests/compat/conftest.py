"""The seed tutorial runs once, inside its test, not when pytest imports modules for doctests.

Shared builders of the compat tests: a tiny Snorkel-style task, model and loaders.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlgraph.compat.snorkel import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Task,
)

collect_ignore = ["snorkel_seed_tutorial.py"]


def snorkel_task(name: str = "t", trunk: str = "base", head: str | None = None) -> Task:
    """``trunk`` (Linear 2->4, ReLU) on ``X["x"]``, then ``head`` (Linear 4->2)."""
    head = head or f"{name}_head"
    pool = nn.ModuleDict({trunk: nn.Sequential(nn.Linear(2, 4), nn.ReLU()), head: nn.Linear(4, 2)})
    return Task(
        name=name,
        module_pool=pool,
        op_sequence=[Operation(trunk, [("_input_", "x")]), Operation(head, [trunk])],
    )


def snorkel_model(seed: int = 0, name: str = "t", **kwargs: str) -> MultitaskClassifier:
    """A one-task model with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return MultitaskClassifier([snorkel_task(name, **kwargs)], device=-1)


def loaders(
    n: int = 32, labels: tuple[str, ...] = ("t",), splits: tuple[str, ...] = ("train", "valid")
) -> list[DictDataLoader]:
    """Loaders of dataset ``d``: label 1 where ``x0 > 0``, one label tensor per name."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return [
        DictDataLoader(
            DictDataset("d", split, {"x": x}, {lb: y.clone() for lb in labels}), batch_size=8
        )
        for split in splits
    ]
