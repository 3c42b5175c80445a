"""Shared fixtures: small tasks and loaders built the way users build them."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, Operation, Task

# No network at test time: pretrained models are built from configs, saved and loaded by path.
os.environ["HF_HUB_OFFLINE"] = "1"


def make_task(
    name: str,
    trunk: nn.Module,
    field: str = "x",
    width: int = 4,
    classes: int = 2,
    head: nn.Module | None = None,
    trunk_name: str = "trunk",
    **kwargs: object,
) -> Task:
    """Task ``name`` = ``trunk`` (shared by name) on ``X[field]`` + its own head ``<name>_head``."""
    return Task(
        name,
        {trunk_name: trunk, f"{name}_head": head or nn.Linear(width, classes)},
        [Operation(trunk_name, [("_input_", field)]), Operation(f"{name}_head", [trunk_name])],
        **kwargs,  # type: ignore[arg-type]
    )


def make_loader(
    name: str, split: str, X: dict, Y: dict, batch_size: int = 8, **kwargs: object
) -> DictDataLoader:
    return DictDataLoader(DictDataset(name, split, X, Y), batch_size=batch_size, **kwargs)  # type: ignore[arg-type]


class Interrupt(nn.Module):
    """Identity that raises KeyboardInterrupt on its ``at``-th training call (0 = never)."""

    def __init__(self, at: int = 0) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt("simulated kill")
        return x


@pytest.fixture
def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU())
