"""A worker for the DDP test of soft labels and slices (importable by spawned children)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.graph.slices import SLICES


def _right(X: dict) -> torch.Tensor:
    return X["x"][:, 1] > 0


def soft_setup() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    torch.manual_seed(0)
    task = Task(
        "t",
        {"trunk": nn.Sequential(nn.Linear(2, 8), nn.ReLU()), "head": nn.Linear(8, 2)},
        [Operation("trunk", [("_input_", "x")]), Operation("head", ["trunk"])],
    )
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(5 * x[:, 0])
    soft = torch.stack([1 - p, p], dim=1)
    loaders = [
        DictDataLoader(DictDataset("d", "train", {"x": x}, {"t": soft}), batch_size=8),
        DictDataLoader(DictDataset("d", "valid", {"x": x[:46]}, {"t": soft[:46]}), batch_size=8),
    ]
    return MultitaskClassifier([task]), loaders


def soft_ddp_worker(rank: int, world: int, port: int, out: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    SLICES.register("right_ddp", _right)
    model, loaders = soft_setup()
    trainer = Trainer(n_epochs=3, lr=0.05, balancer="pcgrad", slices=["right_ddp"])
    trainer.config.progress_bar = False
    trainer.fit(model, loaders)
    os.environ.pop("WORLD_SIZE")
    local = model.score(loaders[1], slices=["right_ddp"])  # one process, the same weights
    out.put((rank, trainer.history[-1], local))
