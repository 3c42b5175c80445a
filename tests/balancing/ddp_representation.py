"""The worker of the representation-level DDP test (a lean module: spawned children import it)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from ddp_workers import BASE, _state, init, torchrun_env, train_setup
from torch import nn

from mtlgraph import MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.balancing import BALANCERS, StepContext

# mgda's coefficients do not change with the Gram matrix's scale, nash_mtl's do
SPECS = (
    {"name": "mgda", "gradients": "representation"},
    {"name": "nash_mtl", "gradients": "representation"},
)


def model_and_batch() -> tuple[MultitaskClassifier, dict, dict]:
    """Two regression heads on a tanh trunk, and a batch of 16 that two ranks split in halves."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_head": nn.Linear(6, 1)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            task_type="regression",
        )
        for t in ("a", "b")
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g)
    return MultitaskClassifier(tasks), {"x": x}, {"a": x[:, 0] - x[:, 2], "b": x[:, 1] * 2}


def one_step(
    spec: dict, rows: slice, reduce: Any = lambda t: t, world_size: int = 1
) -> tuple[list[list[float]], dict[str, float]]:
    """The gradients (every parameter, flattened) and weights of one step on ``rows``."""
    model, X, Y = model_and_batch()
    b = BALANCERS.build(spec)
    b.setup(model.tasks)
    outputs: list = []
    losses, counts = model.calculate_loss(
        {"x": X["x"][rows]}, {t: y[rows] for t, y in Y.items()}, outputs=outputs
    )
    ctx = StepContext(
        model.tasks,
        model.plan(losses),
        counts,
        lambda loss: loss.backward(),
        lambda v: v,
        0,
        reduce,
        outputs,
        world_size,
    )
    b.backward(losses, ctx)
    return [p.grad.reshape(-1).tolist() for p in model.parameters()], b.weights()


def _mean(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor.div_(dist.get_world_size())


def ddp_worker(rank: int, world: int, port: int, out: Any) -> None:
    """One step by hand on this rank's half of the batch, then a Trainer fit under DDP from
    weights that differ between the ranks (DDP broadcasts rank 0's)."""
    torchrun_env(rank, world, port)
    init(rank, world, port)
    try:
        half = slice(8 * rank, 8 * rank + 8)
        for spec in SPECS:
            out.put(("step", spec["name"], rank, one_step(spec, half, _mean, world)))
        for spec in SPECS:
            model, loaders = train_setup(init_seed=100 + rank)
            trainer = Trainer(**{**BASE, "n_epochs": 1}, batch_scheduler="mixed", balancer=spec)
            trainer.fit(model, loaders)
            assert trainer.balancer is not None
            out.put(("fit", spec["name"], rank, (_state(model), trainer.balancer.weights())))
    finally:
        dist.destroy_process_group()
