"""The worker of the new balancers' DDP test (a lean module: spawned children import it)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from ddp_workers import BASE, _state, init, torchrun_env, train_setup

from mtlgraph import Trainer

# The stateful ones and those that reduce loss values (famo, db_mtl, stch, go4align, moco); the
# others share the gradient rows' path (ctx.reduce on the (K, P) rows, tested in
# test_new_balancers.py) with nash_mtl and gradvac.
DDP_METHODS = (
    "famo",
    "nash_mtl",
    "gradvac",
    "db_mtl",
    "stch",
    "go4align",
    "moco",
    "sdmgrad",
    "excess_mtl",
)
SPECS: dict[str, Any] = {"stch": {"name": "stch", "warmup_epochs": 0}}  # past the warm-up


def ddp_worker(rank: int, world: int, port: int, out: Any) -> None:
    """New balancers on two ranks that start from different weights (DDP broadcasts)."""
    torchrun_env(rank, world, port)
    init(rank, world, port)
    try:
        for name in DDP_METHODS:
            model, loaders = train_setup(init_seed=100 + rank)
            balancer = SPECS.get(name, name)
            trainer = Trainer(**{**BASE, "n_epochs": 1}, batch_scheduler="mixed", balancer=balancer)
            trainer.fit(model, loaders)
            assert trainer.balancer is not None
            out.put((name, rank, _state(model), trainer.balancer.weights()))
    finally:
        dist.destroy_process_group()
