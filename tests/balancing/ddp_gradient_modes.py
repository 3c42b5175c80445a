"""The worker of the gradient modes' DDP test (a lean module: spawned children import it)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from ddp_workers import BASE, _state, init, torchrun_env, train_setup

from mtlgraph import MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.balancing import BALANCERS, StepContext

SPECS: tuple[dict[str, Any], ...] = (
    {"name": "mgda"},
    {"name": "mgda", "gradients": "gram"},
    {"name": "upgrad", "gradients": "gram"},
)


def model_and_batch() -> tuple[MultitaskClassifier, dict, dict]:
    """Three regression tasks on a shared trunk and one batch of 16 rows (every label active)."""
    torch.manual_seed(5)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6))
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_head": torch.nn.Linear(6, 1)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            task_type="regression",
        )
        for t in "abc"
    ]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 4, generator=g)
    y = {"a": x[:, 0] * 3, "b": -x[:, 1] + x[:, 2], "c": x[:, 3] - x[:, 0]}
    return MultitaskClassifier(tasks), {"x": x}, y


def gradients(spec: dict[str, Any], rows: slice, reduce: Any) -> list[Any]:
    """The parameters' gradients after one balancer step on the batch's ``rows``."""
    model, X, Y = model_and_batch()
    losses, counts = model.calculate_loss({"x": X["x"][rows]}, {t: y[rows] for t, y in Y.items()})
    ctx = StepContext(
        model.tasks,
        model.plan(losses),
        counts,
        lambda loss: loss.backward(),
        lambda loss: loss,
        0,
        reduce,
    )
    balancer = BALANCERS.build(spec)
    balancer.setup(model.tasks)
    balancer.backward(losses, ctx)
    return [p.grad.numpy().copy() for p in model.parameters()]


def ddp_worker(rank: int, world: int, port: int, out: Any) -> None:
    """Each rank steps on its half of the batch, averaging through all_reduce."""
    init(rank, world, port)

    def mean_(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t.div_(world)

    try:
        half = 16 // world
        for i, spec in enumerate(SPECS):
            out.put((i, rank, gradients(spec, slice(rank * half, (rank + 1) * half), mean_)))
    finally:
        dist.destroy_process_group()


def trainer_worker(rank: int, world: int, port: int, out: Any) -> None:
    """``Trainer.fit`` on two ranks with ``gradients: gram`` (ranks start from different
    weights: DDP broadcasts rank 0's)."""
    torchrun_env(rank, world, port)
    init(rank, world, port)
    try:
        model, loaders = train_setup(init_seed=100 + rank)
        spec = {"name": "mgda", "gradients": "gram"}
        trainer = Trainer(**{**BASE, "n_epochs": 1}, batch_scheduler="mixed", balancer=spec)
        trainer.fit(model, loaders)
        assert trainer.balancer is not None
        out.put((rank, _state(model), trainer.balancer.weights()))
    finally:
        dist.destroy_process_group()
