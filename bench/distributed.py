"""Distributed throughput: 1 vs 2 ranks under torchrun, mtlgraph vs a hand-written DDP loop.

The launcher runs this same file under ``torch.distributed.run`` once per (ranks, loop) pair; each
worker trains a compute-bound two-task model (wide MLP trunk, one head per task, the ``mixed``
scheduler so every step holds both tasks) and rank 0 prints its examples per second. Reported:
the 2-rank / 1-rank throughput ratio of each loop, and mtlgraph's throughput relative to the
hand-written DistributedDataParallel loop on the same data, batches and optimizer.

Every rank runs one thread (as torchrun sets ``OMP_NUM_THREADS=1``), so on an N-core machine the
2-rank run can use two cores where the 1-rank run uses one. On this 2-core machine expect little
real gain beyond that; on a GPU machine use ``--device cuda`` (nccl, one GPU per rank: the rank
counts are capped at the GPUs present).

Run: ``python bench/distributed.py [--device cpu|cuda] [--steps 60] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: build the data and model, train, print examples/second (rank 0)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer

    torch.set_num_threads(1)
    # A process's first optimizer imports torch._dynamo (seconds): pay it before any timing.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if world > 1:  # outside the timings of both loops (mtlgraph uses an existing group as is)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    g = torch.Generator().manual_seed(0)
    rows = args.batch_size * args.steps  # per task and epoch, over all ranks
    data = []
    for i in range(2):
        x = torch.randn(rows, args.width, generator=g)
        data.append((x, (x[:, i] > 0).long()))
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(args.width, 2 * args.width),
        nn.ReLU(),
        nn.Linear(2 * args.width, args.width),
        nn.ReLU(),
    )
    heads = [nn.Linear(args.width, 2) for _ in range(2)]
    per_rank_batch = args.batch_size // world
    if args.loop == "mtlgraph":
        tasks = [
            Task(
                f"t{i}",
                {"trunk": trunk, f"h{i}": heads[i]},
                [Operation("trunk", [("_input_", "x")]), Operation(f"h{i}", ["trunk"])],
            )
            for i in range(2)
        ]
        model = MultitaskClassifier(tasks, device=device)
        loaders = [
            DictDataLoader(
                DictDataset(f"d{i}", "train", {"x": x}, {f"t{i}": y}),
                batch_size=per_rank_batch,
                shuffle=True,
                seed=i,
            )
            for i, (x, y) in enumerate(data)
        ]
        trainer = Trainer(
            n_epochs=args.epochs,
            lr=1e-3,
            progress_bar=False,
            batch_scheduler="mixed",
            evaluation_freq=0,
        )
        start = time.perf_counter()
        trainer.fit(model, loaders)
        seconds = time.perf_counter() - start
    else:

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.trunk, self.heads = trunk, nn.ModuleList(heads)

            def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
                return [h(self.trunk(x)) for h, x in zip(self.heads, xs, strict=True)]

        net: nn.Module = Net().to(device)
        if world > 1:
            net = DistributedDataParallel(
                net,
                device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        samplers = [
            DistributedSampler(range(rows), world, rank, shuffle=True, seed=i) for i in range(2)
        ]
        start = time.perf_counter()
        for epoch in range(args.epochs):
            orders = []
            for s in samplers:
                s.set_epoch(epoch)
                orders.append(torch.tensor(list(iter(s))))
            for b in range(0, len(orders[0]), per_rank_batch):
                xs, ys = [], []
                for (x, y), order in zip(data, orders, strict=True):
                    idx = order[b : b + per_rank_batch]
                    xs.append(x[idx].to(device))
                    ys.append(y[idx].to(device))
                outs = net(xs)
                loss = sum(nn.functional.cross_entropy(o, y) for o, y in zip(outs, ys, strict=True))
                loss.backward()  # type: ignore[union-attr]
                opt.step()
                opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        examples = 2 * rows * args.epochs
        print(json.dumps({"examples_per_s": examples / seconds, "seconds": seconds}), flush=True)


def launch(ranks: int, loop: str, args: argparse.Namespace) -> float:
    """Examples per second of one torchrun launch (rank 0's measurement)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={ranks}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        __file__,
        "--worker",
        "--loop",
        loop,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--epochs",
        str(args.epochs),
        "--width",
        str(args.width),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return float(json.loads(line)["examples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description="mtlgraph DDP throughput benchmark")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="mtlgraph", choices=["mtlgraph", "raw"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps an epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch per task")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rank_counts = [1, 2]
    if args.device == "cuda":
        import torch

        rank_counts = [1, min(2, torch.cuda.device_count())]
    print(
        f"device {args.device}; global batch {args.batch_size}/task; "
        f"{args.steps} steps/epoch x {args.epochs} epochs; width {args.width}"
    )
    results: dict[tuple[int, str], float] = {}
    for ranks in dict.fromkeys(rank_counts):
        for loop in ("raw", "mtlgraph"):
            results[(ranks, loop)] = statistics.median(
                launch(ranks, loop, args) for _ in range(args.repeats)
            )
            print(f"  {ranks} rank(s) {loop:>8}: {results[(ranks, loop)]:9.0f} examples/s")
    top = max(rank_counts)
    for loop in ("raw", "mtlgraph"):
        print(
            f"{loop}: {top} ranks / 1 rank throughput = "
            f"{results[(top, loop)] / results[(1, loop)]:.2f}x"
        )
    print(
        f"mtlgraph / hand-written DDP at {top} ranks: "
        f"{results[(top, 'mtlgraph')] / results[(top, 'raw')]:.3f}x throughput"
    )


if __name__ == "__main__":
    main()
