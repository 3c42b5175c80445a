"""Many tasks: time and peak memory per step of the gradient methods as the task count grows.

A CelebA-like problem: ``T`` binary heads on a small conv trunk over generated 32x32 RGB images
(random pixels, labels from fixed random projections of the pixels; nothing is downloaded);
``--trunk wide`` swaps in a 4.3M-parameter MLP trunk, where the ``K × P`` rows dominate memory.
For ``T`` in ``--tasks`` and every gradient method in ``--methods``, each way of taking the task
gradients (``docs/balancing.md``, "How task gradients are computed"): ``per_task`` (one backward
pass per task, ``gradients: parameters``' default on a CPU), ``batched`` (vmapped passes of
``--tasks-per-pass`` tasks, 0: all; the default off the CPU) and ``gram`` (``gradients: gram``,
its chunks' passes as ``--tasks-per-pass`` says), against ``sum`` (one backward pass of the summed
losses).

Each configuration runs in a fresh process: ``--steps`` SGD steps after two warm-up steps, the
median seconds per step, and the peak resident memory of the steps above what the process held
before them (``ru_maxrss``; model, data and one no-grad forward are in the baseline).
CPU only. The machine may be shared: compare ratios within one run.

``torchjd``: TorchJD's autogram engine on the trunk (Gramian without the Jacobian, then
``losses.backward(weights)``) for ``mgda`` and ``cagrad``. Not here
yet: LibMTL (through ``bench/_libmtl_shim.py``) and the ``representation`` mode.

Run (from the repository root):
``python -m bench.many_tasks [--tasks 2 10 40] [--methods mgda upgrad] [--steps 5]
[--batch 64] [--threads 1] [--tasks-per-pass 8] [--json bench/results/many_tasks.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` and the worktree importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlgraph import MultitaskClassifier, Operation, Task
from mtlgraph.balancing import BALANCERS, GradientBalancer, StepContext

MODES = ("per_task", "batched", "gram", "torchjd")
METHODS = ("mgda", "upgrad", "cagrad", "nash_mtl", "pcgrad", "imtl", "aligned_mtl")


def trunk() -> nn.Module:
    """A small conv trunk: 32x32x3 -> 64 features (~30k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
    )


def wide_trunk() -> nn.Module:
    """A wide MLP trunk on the flattened image: ~4.3M parameters, small activations (the case
    where the ``K × P`` rows dominate memory)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 64),
        nn.ReLU(),
    )


TRUNKS = {"conv": trunk, "wide": wide_trunk}


def build(
    n_tasks: int, batch: int, seed: int = 0, kind: str = "conv"
) -> tuple[MultitaskClassifier, dict, dict]:
    """The model (a 2-class head per task) and one batch of images with every task's labels."""
    torch.manual_seed(seed)
    shared = TRUNKS[kind]()
    tasks = [
        Task(
            f"t{i}",
            {"trunk": shared, f"h{i}": nn.Linear(64, 2)},
            [Operation("trunk", [("_input_", "image")]), Operation(f"h{i}", ["trunk"])],
        )
        for i in range(n_tasks)
    ]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    projections = torch.randn(n_tasks, 3 * 32 * 32, generator=g)
    y = (x.reshape(batch, -1) @ projections.T > 0).long()
    return MultitaskClassifier(tasks), {"image": x}, {f"t{i}": y[:, i] for i in range(n_tasks)}


def balancer_for(method: str, mode: str, tasks_per_pass: int = 0) -> Any:
    if method == "sum":
        return BALANCERS.build("sum")
    b = BALANCERS.build({"name": method, "gradients": "gram" if mode == "gram" else "parameters"})
    assert isinstance(b, GradientBalancer)
    b.tasks_per_pass = 1 if mode == "per_task" else tasks_per_pass  # 1: one pass per task
    return b


TORCHJD = {"mgda": "MGDAWeighting", "cagrad": "CAGradWeighting"}  # (UPGrad needs quadprog)


def torchjd_backward(model: MultitaskClassifier, method: str) -> Any:
    """TorchJD's autogram engine on the shared trunk: the Gramian of the task losses, the
    method's weights from it, then ``losses.backward(weights)`` (its heads get ``w_i ∇L_i``)."""
    from torchjd import aggregation, autogram

    engine = autogram.Engine(model.module_pool["trunk"], batch_dim=None)
    weighting = getattr(aggregation, TORCHJD[method])()

    def backward(losses: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack(list(losses.values()))
        stacked.backward(weighting(engine.compute_gramian(stacked)))

    return backward


def run_one(
    method: str,
    mode: str,
    n_tasks: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Median seconds per step and the steps' peak memory above the warm-up (MiB)."""
    model, X, Y = build(n_tasks, args.batch, kind=args.trunk)
    tasks_per_pass, steps = args.tasks_per_pass, args.steps
    peer = torchjd_backward(model, method) if mode == "torchjd" else None
    balancer = balancer_for(method, "gram" if peer else mode, tasks_per_pass)
    balancer.setup(model.tasks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses, counts = model.calculate_loss(X, Y)
        if peer is not None:
            peer(losses)
        else:
            ctx = StepContext(
                model.tasks, model.plan(losses), counts, lambda v: v.backward(), lambda v: v, 0
            )
            balancer.backward(losses, ctx)
        opt.step()
        return time.perf_counter() - start

    with torch.no_grad():
        model.calculate_loss(X, Y)  # the forward's buffers in the baseline, not the gradients
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (the batched trial, caches)
    times = [step() for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 1024}


def in_fresh_process(
    method: str, mode: str, n_tasks: int, args: argparse.Namespace
) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.many_tasks", "--one", method, mode, str(n_tasks)]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--tasks-per-pass", str(args.tasks_per_pass), "--trunk", args.trunk]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="gradient methods at many tasks")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument(
        "--tasks-per-pass", type=int, default=0, help="batched, gram: tasks a pass (0: all)"
    )
    parser.add_argument("--trunk", default="conv", choices=sorted(TRUNKS))
    parser.add_argument("--json", default=None, help="write the rows here (JSON)")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MODE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        method, mode, n = args.one
        one = run_one(method, mode, int(n), args)
        print(json.dumps(one))
        return []
    rows = []
    print(f"{'T':>3} {'method':<12} {'mode':<9} {'s/step':>8} {'x sum':>6} {'peak MiB':>9}")
    for n_tasks in args.tasks:
        base = in_fresh_process("sum", "sum", n_tasks, args)
        rows.append({"tasks": n_tasks, "method": "sum", "mode": "-", **base})
        print(
            f"{n_tasks:>3} {'sum':<12} {'-':<9} {base['seconds']:8.4f} {1.0:6.2f} "
            f"{base['peak_mib']:9.1f}"
        )
        for method in args.methods:
            for mode in args.modes:
                if mode == "torchjd" and method not in TORCHJD:
                    continue
                r = in_fresh_process(method, mode, n_tasks, args)
                ratio = r["seconds"] / base["seconds"]
                rows.append({"tasks": n_tasks, "method": method, "mode": mode, **r})
                print(
                    f"{n_tasks:>3} {method:<12} {mode:<9} {r['seconds']:8.4f} {ratio:6.2f} "
                    f"{r['peak_mib']:9.1f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
