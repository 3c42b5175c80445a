"""Functions run in spawned worker processes by the distributed tests (importable by children)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
from mtlgraph.distributed import (
    DistEnv,
    gather_predictions,
    shard_eval_loader,
    shard_train_loader,
)


def small_model(seed: int = 0) -> MultitaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_head": nn.Linear(8, 2)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
        )
        for t in ("a", "b")
    ]
    return MultitaskClassifier(tasks)


def small_data(n: int, split: str, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return DictDataset("d", split, {"x": x}, {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()})


def init(rank: int, world: int, port: int) -> DistEnv:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, rank)


def sharding_worker(rank: int, world: int, port: int, out: Any) -> None:
    env = init(rank, world, port)
    try:
        train = DictDataLoader(small_data(23, "train"), batch_size=4, shuffle=True, seed=3)
        sharded = shard_train_loader(train, env)
        sharded.set_epoch(1)
        rows = torch.cat([y["a"] * 0 + torch.arange(len(y["a"])) for _, y in sharded])
        valid = DictDataLoader(small_data(23, "valid"), batch_size=5)
        shard = shard_eval_loader(valid, env)
        model = small_model()
        local = model.predict(shard, return_preds=True)
        full = gather_predictions(local, shard.sampler.indices, len(valid.dataset))  # type: ignore[attr-defined]
        scores = model.score_predictions(full, "d", "valid")
        out.put(
            (rank, len(sharded), len(rows), scores, {k: v["a"].tolist() for k, v in full.items()})
        )
    finally:
        dist.destroy_process_group()
