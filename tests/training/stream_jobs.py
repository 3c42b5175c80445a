"""Training on a stream mixed with an in-memory dataset: uninterrupted, interrupted and resumed.

Importable by spawned DDP ranks and by the SIGKILL subprocess (``python stream_jobs.py RUN_DIR
WORKERS BLOCK_AT``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, NamedDataset, Operation, Task
from mtlgraph.data.streams import ExampleStream


class Shards(ExampleStream):
    """``units`` shards of ``rows`` examples; example ``(u, r)`` has id ``100 u + r``."""

    labels = ("a",)

    def __init__(self, units: int = 6, rows: int = 10) -> None:
        self.units, self.rows = units, rows

    def num_units(self) -> int:
        return self.units

    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[tuple[dict, dict]]:
        for r in range(start, self.rows):
            x = torch.tensor([math.sin(7.0 * unit + r), math.cos(3.0 * unit + 1.3 * r)])
            ident = torch.tensor(100 * unit + r)
            yield {"x": x, "id": ident}, {"a": (x[0] > 0).long()}

    def num_examples(self) -> int:
        return self.units * self.rows


class Gate(nn.Module):
    """Identity on the trunk's output; on its ``trip``-th training call raises
    KeyboardInterrupt; with ``block`` set, once a checkpoint exists in ``block`` and ``after``
    more training calls passed, writes ``<block>/blocked`` and sleeps (to be SIGKILLed)."""

    def __init__(self, trip: int = 0, block: str | None = None, after: int = 4) -> None:
        super().__init__()
        self.trip, self.block, self.after, self.calls, self.seen = trip, block, after, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.trip:
                raise KeyboardInterrupt("simulated interruption")
            if self.block and (Path(self.block) / "checkpoints" / "last.pt").exists():
                self.seen += 1
                if self.seen > self.after:
                    (Path(self.block) / "blocked").write_text("blocked")
                    time.sleep(600)
        return x


def setup(workers: int, gate: Gate | None = None) -> tuple[MultitaskClassifier, list[Any]]:
    """Task ``a`` on a stream (``workers`` DataLoader workers), task ``b`` in memory."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2))
    gate = gate or Gate()
    tasks = [
        Task(
            t,
            {"trunk": trunk, "gate": gate, f"{t}_head": nn.Linear(16, 2)},
            [
                Operation("trunk", [("_input_", "x")]),
                Operation("gate", ["trunk"]),
                Operation(f"{t}_head", ["gate"]),
            ],
        )
        for t in ("a", "b")
    ]
    g = torch.Generator().manual_seed(3)
    xb = torch.randn(40, 2, generator=g)
    stream = NamedDataset("s", "train", Shards())
    options: dict[str, Any] = {}
    if workers:
        options = {"persistent_workers": True, "prefetch_factor": 2, "pin_memory": False}
    loaders = [
        DictDataLoader(stream, batch_size=4, shuffle=True, seed=9, num_workers=workers, **options),
        DictDataLoader(
            DictDataset("d", "train", {"x": xb}, {"b": (xb[:, 1] > 0).long()}),
            batch_size=8,
            shuffle=True,
            seed=2,
        ),
        DictDataLoader(NamedDataset("s", "valid", Shards(units=2)), batch_size=8),
    ]
    return MultitaskClassifier(tasks), loaders


CONFIG: dict[str, Any] = {
    "n_epochs": 2,
    "lr": 0.05,
    "progress_bar": False,
    "batch_scheduler": {"name": "temperature", "temperature": 2.0},
    "steps_per_epoch": 12,
    "checkpoint_every": 3,
    "checkpoint_unit": "steps",
    "evaluation_unit": "steps",
    "evaluation_freq": 5,
    "distributed_timeout": 60.0,
}


def params(model: nn.Module) -> dict[str, Any]:
    """Parameters as numpy arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def main(run_dir: str, workers: int) -> None:
    """Train into ``run_dir``; block (for a SIGKILL) a few steps after the first checkpoint."""
    from mtlgraph import Trainer

    model, loaders = setup(workers, Gate(block=run_dir))
    Trainer(run_dir=run_dir, **CONFIG).fit(model, loaders)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    os._exit(0)


def ddp_worker(rank: int, world: int, port: int, tmp: str, out: Any) -> None:
    """Under DDP with 2 DataLoader workers per rank: one pass's example ids through this rank's
    shard of the stream, then an uninterrupted run, an interrupted one and its resume."""
    import torch.distributed as dist

    from mtlgraph import Trainer
    from mtlgraph.training.distributed import DistEnv, shard_train_loader

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, loaders = setup(2)
        shard = shard_train_loader(loaders[0], DistEnv(rank, world, rank))
        ids = [int(i) for x, _ in shard for i in x["id"].tolist()]
        results: dict[str, Any] = {"ids": ids}
        for phase in ("ref", "cut", "resume"):
            model, loaders = setup(2, Gate(trip=2 * 7 + 1) if phase == "cut" else None)
            run_dir = os.path.join(tmp, "ref" if phase == "ref" else "run")
            trainer = Trainer(run_dir=run_dir, **CONFIG)
            try:
                trainer.fit(model, loaders, resume_from=run_dir if phase == "resume" else None)
            except KeyboardInterrupt:
                results[phase] = "interrupted"
                continue
            results[phase] = (params(model), trainer.history)
        out.put((rank, results))
    finally:
        dist.destroy_process_group()
