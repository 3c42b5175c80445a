"""Functions run in spawned worker processes by the distributed tests (importable by children)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
from mtlgraph.training.distributed import (
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


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun would set for this rank."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


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


class Tripwire(nn.Module):
    """Identity; on its ``at``-th training call raises KeyboardInterrupt, or kills the process
    when ``hard`` (a rank that dies without a word)."""

    def __init__(self, at: int = 0, hard: bool = False) -> None:
        super().__init__()
        self.at, self.hard, self.calls = at, hard, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                if self.hard:
                    os._exit(3)
                raise KeyboardInterrupt("simulated interruption")
        return x


def train_setup(init_seed: int, trip: Tripwire | None = None) -> tuple[MultitaskClassifier, list]:
    """Two tasks on a dropout trunk; datasets of different sizes, one with ignored labels."""
    torch.manual_seed(init_seed)
    trunk = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2))
    stop = trip or Tripwire()
    tasks = [
        Task(
            t,
            {"trunk": trunk, "stop": stop, f"{t}_head": nn.Linear(16, 2)},
            [
                Operation("trunk", [("_input_", "x")]),
                Operation("stop", ["trunk"]),
                Operation(f"{t}_head", ["stop"]),
            ],
        )
        for t in ("a", "b")
    ]
    g = torch.Generator().manual_seed(11)
    xa, xb = torch.randn(150, 2, generator=g), torch.randn(90, 2, generator=g)
    yb = (xb[:, 1] > 0).long()
    yb[:40] = -1  # a whole batch of ignored labels on some rank's shard
    loaders = [
        DictDataLoader(
            DictDataset("da", "train", {"x": xa}, {"a": (xa[:, 0] > 0).long()}),
            batch_size=8,
            shuffle=True,
            seed=1,
        ),
        DictDataLoader(
            DictDataset("db", "train", {"x": xb}, {"b": yb}), batch_size=8, shuffle=True, seed=2
        ),
        DictDataLoader(
            DictDataset("da", "valid", {"x": xa[:70]}, {"a": (xa[:70, 0] > 0).long()}),
            batch_size=16,
        ),
        DictDataLoader(
            DictDataset("db", "valid", {"x": xb[:50]}, {"b": (xb[:50, 1] > 0).long()}),
            batch_size=16,
        ),
    ]
    return MultitaskClassifier(tasks), loaders


SCENARIOS: dict[str, dict[str, Any]] = {
    "shuffled": {"batch_scheduler": "shuffled"},
    "mixed": {"batch_scheduler": "mixed"},
    "pcgrad": {"batch_scheduler": "mixed", "balancer": {"name": "pcgrad", "seed": 4}},
    "uncertainty+dwa-free": {"batch_scheduler": "mixed", "balancer": "uncertainty"},
    "diagnostics": {"batch_scheduler": "mixed", "diagnostics": {"every": 4}},
    "gradnorm+accumulation": {
        "batch_scheduler": "mixed",
        "balancer": "gradnorm",
        "grad_accumulation_steps": 2,
    },
}
BASE = {"n_epochs": 2, "lr": 0.02, "progress_bar": False, "distributed_timeout": 30.0}


def _state(model: nn.Module) -> dict[str, Any]:
    """Parameters as numpy arrays (tensors in a queue would outlive their sending process)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def train_worker(rank: int, world: int, port: int, tmp: str, out: Any) -> None:
    """Every scenario, on every rank; ranks start from different weights (DDP broadcasts)."""
    from mtlgraph import Trainer

    torchrun_env(rank, world, port)
    init(rank, world, port)
    try:
        for name, extra in SCENARIOS.items():
            model, loaders = train_setup(init_seed=100 + rank)
            run_dir = os.path.join(tmp, name, f"rank{rank}")
            trainer = Trainer(
                **BASE,
                **extra,
                run_dir=run_dir,
                checkpoint_every=3,
                checkpoint_unit="steps",
                evaluation_unit="steps",
                evaluation_freq=4,
            )
            trainer.fit(model, loaders)
            out.put((name, rank, _state(model), trainer.history, os.path.exists(run_dir)))
    finally:
        dist.destroy_process_group()


RESUMED_BALANCERS = ("uncertainty", "dwa")


def resume_worker(rank: int, world: int, port: int, tmp: str, phase: str, out: Any) -> None:
    """phase "ref": uninterrupted; "cut": interrupted at a step; "resume": continue "cut".

    The interruption falls in the second of three epochs, so DWA's weights depend on the loss
    records of the interrupted epoch, which each rank must get back.
    """
    from mtlgraph import Trainer

    torchrun_env(rank, world, port)
    init(rank, world, port)  # one group for both runs (fit uses an existing group as is)
    for balancer in RESUMED_BALANCERS:
        trip = Tripwire(at=2 * 13 + 1) if phase == "cut" else None  # mixed: 2 calls per step
        model, loaders = train_setup(init_seed=7, trip=trip)
        run = os.path.join(tmp, balancer, "ref" if phase == "ref" else "run")
        cfg = {
            **BASE,
            "n_epochs": 3,
            "batch_scheduler": "mixed",
            "balancer": balancer,
            "run_dir": run,
            "checkpoint_every": 4,
            "checkpoint_unit": "steps",
            "evaluation_unit": "steps",
            "evaluation_freq": 5,
        }
        trainer = Trainer(**cfg)
        try:
            trainer.fit(model, loaders, resume_from=run if phase == "resume" else None)
            out.put((phase, balancer, rank, (_state(model), trainer.history)))
        except KeyboardInterrupt:
            out.put((phase, balancer, rank, "interrupted"))
    dist.destroy_process_group()


def dying_worker(rank: int, world: int, port: int, out: Any) -> None:
    """Rank 1 dies abruptly in its 5th training call; rank 0 must fail, not hang."""
    from mtlgraph import Trainer

    torchrun_env(rank, world, port)
    trip = Tripwire(at=5, hard=True) if rank == 1 else None
    model, loaders = train_setup(init_seed=0, trip=trip)
    try:
        Trainer(**{**BASE, "distributed_timeout": 15.0}).fit(model, loaders)
        out.put((rank, "finished"))
    except Exception as e:  # reported to the test, then re-raised: the process exits non-zero
        out.put((rank, f"{type(e).__name__}: {e}"[:300]))
        raise


def signal_worker(rank: int, world: int, port: int, tmp: str, out: Any) -> None:
    """Rank 1 alone gets SIGTERM after optimizer step 3: every rank must stop after step 3."""
    import signal

    from mtlgraph import Hook, Trainer
    from mtlgraph.exceptions import TrainingInterrupted

    class TermAt(Hook):
        def on_step_end(self, run: Any) -> None:
            if rank == 1 and run.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    torchrun_env(rank, world, port)
    init(rank, world, port)
    try:
        model, loaders = train_setup(init_seed=0)
        trainer = Trainer(**BASE, run_dir=os.path.join(tmp, f"rank{rank}"), hooks=[TermAt()])
        try:
            trainer.fit(model, loaders)
            out.put((rank, "finished", None))
        except TrainingInterrupted as e:
            out.put((rank, e.step, e.signal_name))
        out.put((rank, "handler", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL))
    finally:
        dist.destroy_process_group()
