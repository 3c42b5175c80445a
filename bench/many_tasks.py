"""Many tasks: time and peak memory per step of the gradient methods as the task count grows.

A CelebA-like problem: ``T`` binary heads on a small conv trunk over generated 32x32 RGB images
(random pixels, labels from fixed random projections of the pixels; nothing is downloaded);
``--trunk wide`` swaps in a 4.3M-parameter MLP trunk, where the ``K × P`` rows dominate memory.
For ``T`` in ``--tasks`` and every gradient method in ``--methods``, each way of taking the task
gradients (``docs/balancing.md``, "How task gradients are computed"): ``per_task`` (one backward
pass per task, ``gradients: parameters``' default on a CPU), ``batched`` (vmapped passes of
``--tasks-per-pass`` tasks, 0: all; the default off the CPU) and ``gram`` (``gradients: gram``,
its chunks' passes as ``--tasks-per-pass`` says) and ``representation`` (``gradients:
representation``: one ``autograd.grad`` per task to the trunk's output, one pass through the
trunk), against ``sum`` (one backward pass of the summed losses), and the peers on the same model
(the same trunk and heads, one instance) and batch:

- ``torchjd``: TorchJD's autogram engine on the trunk (Gramian without the Jacobian, then
  ``losses.backward(weights)``) for ``mgda``, ``upgrad``, ``pcgrad`` and ``imtl`` (its CAGrad
  needs cvxpy; it has no Nash-MTL weighting);
- ``libmtl``: LibMTL 1.1.5's weighting ``backward`` on a host module around the trunk and heads
  (``bench/_libmtl_shim.py``), with ``rep_grad=True`` for ``mgda`` and ``imtl`` (the methods
  among these that LibMTL supports it for), on the shared parameters for ``cagrad`` and
  ``pcgrad`` (they refuse ``rep_grad``; its CAGrad hard-codes three tasks and fails on others); it
  has no UPGrad and (1.1.5) no Nash-MTL.

Each configuration runs in a fresh process: ``--steps`` SGD steps after one warm-up step (more,
up to 500, until the steps took ``--min-time`` seconds: cheap steps are noisy), the
median seconds per step (zero_grad, forward, backward and the optimizer step), and the peak
resident memory of the steps above what the process held before them (``ru_maxrss``; model, data
and one no-grad forward are in the baseline). CPU only. The machine may be shared: compare ratios
within one run. The table gives each row's time and peak against ``sum`` and against each peer's
row for the same method and ``T``; a configuration that fails is reported as such and left out of
the ratios.

Run (from the repository root):
``python -m bench.many_tasks [--tasks 2 10 40] [--methods mgda upgrad] [--modes gram libmtl]
[--steps 5] [--min-time 2] [--batch 64] [--threads 1] [--tasks-per-pass 8]
[--json bench/results/many_tasks.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: make `bench` and the worktree importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlgraph import MultitaskClassifier, Operation, Task
from mtlgraph.balancing import BALANCERS, GradientBalancer, StepContext

MODES = ("per_task", "batched", "gram", "representation", "torchjd", "libmtl")
PEERS = ("torchjd", "libmtl")
METHODS = ("mgda", "upgrad", "cagrad", "nash_mtl", "pcgrad", "imtl", "aligned_mtl")
MAX_STEPS = 500  # with --min-time
CAGRAD_C = 0.4  # mtlgraph's default c, given to the peers' CAGrad too


def trunk() -> nn.Module:
    """A small conv trunk: 32x32x3 -> 64 features (16,448 parameters)."""
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


GRADIENTS = {"gram": "gram", "representation": "representation"}  # other modes: parameters


def balancer_for(method: str, mode: str, tasks_per_pass: int = 0) -> Any:
    if method == "sum":
        return BALANCERS.build("sum")
    spec: dict[str, Any] = {"name": method, "gradients": GRADIENTS.get(mode, "parameters")}
    if method == "cagrad":
        spec["c"] = CAGRAD_C
    b = BALANCERS.build(spec)
    assert isinstance(b, GradientBalancer)
    b.tasks_per_pass = 1 if mode == "per_task" else tasks_per_pass  # 1: one pass per task
    return b


# TorchJD weightings (from the Gramian; its CAGrad needs cvxpy, not installed here) and LibMTL
# weightings (class, rep_grad, backward kwargs)
TORCHJD = {
    "mgda": ("MGDAWeighting", {}),
    "upgrad": ("UPGradWeighting", {}),
    "pcgrad": ("PCGradWeighting", {}),
    "imtl": ("IMTLGWeighting", {}),
}
LIBMTL: dict[str, tuple[str, bool, dict[str, Any]]] = {  # LibMTL 1.1.5 has rep_grad for these two
    "mgda": ("MGDA", True, {"mgda_gn": "none"}),
    "imtl": ("IMTL", True, {}),
    "cagrad": ("CAGrad", False, {"calpha": CAGRAD_C, "rescale": 1}),
    "pcgrad": ("PCGrad", False, {}),
}


def has_mode(method: str, mode: str) -> bool:
    return {"torchjd": method in TORCHJD, "libmtl": method in LIBMTL}.get(mode, True)


Step = Callable[[], None]  # one step's forward and backward (the gradients, not the update)
Built = tuple[Step, list[nn.Parameter]]  # and the parameters the optimizer updates


def torchjd_step(model: MultitaskClassifier, method: str, X: dict, Y: dict) -> Built:
    """TorchJD's autogram engine on the shared trunk: the Gramian of the task losses, the
    method's weights from it, then ``losses.backward(weights)`` (its heads get ``w_i ∇L_i``)."""
    from torchjd import aggregation, autogram

    engine = autogram.Engine(model.module_pool["trunk"], batch_dim=None)
    name, kwargs = TORCHJD[method]
    weighting = getattr(aggregation, name)(**kwargs)

    def step() -> None:
        losses, _ = model.calculate_loss(X, Y)
        stacked = torch.stack(list(losses.values()))
        stacked.backward(weighting(engine.compute_gramian(stacked)))

    return step, list(model.parameters())


def libmtl_step(model: MultitaskClassifier, method: str, X: dict, Y: dict) -> Built:
    """LibMTL's weighting ``backward`` on a LibMTL-style host around the same trunk and heads
    (``rep_grad`` where LibMTL 1.1.5 has it), the losses as its ``Trainer`` takes them."""
    from bench import _libmtl_shim

    name, rep_grad, kwargs = LIBMTL[method]
    heads = {t: model.module_pool[f"h{i}"] for i, t in enumerate(model.tasks)}
    host = _libmtl_shim.host(
        _libmtl_shim.weighting_class(name), model.module_pool["trunk"], heads, 1, rep_grad
    )

    def step() -> None:
        out = host(X["image"])
        losses = torch.stack([F.cross_entropy(out[t], Y[t]) for t in heads])
        host.backward(losses, **kwargs)

    return step, list(host.parameters())  # IMTL's loss scales are the host's parameters


def ours_step(
    model: MultitaskClassifier, method: str, mode: str, X: dict, Y: dict, tasks_per_pass: int
) -> Built:
    """mtlgraph's balancer for ``method`` taking its task gradients as ``mode`` says, driven the
    way the Trainer drives it (losses, a StepContext, the forward's outputs if it reads them)."""
    balancer = balancer_for(method, mode, tasks_per_pass)
    balancer.setup(model.tasks)

    keep = balancer.needs_outputs  # the forward's outputs are kept only then, as a Trainer does

    def step() -> None:
        outputs: list = []
        losses, counts = model.calculate_loss(X, Y, outputs=outputs if keep else None)
        ctx = StepContext(
            model.tasks,
            model.plan(losses),
            counts,
            lambda v: v.backward(),
            lambda v: v,
            0,
            outputs=outputs,
        )
        balancer.backward(losses, ctx)

    return step, list(model.parameters())


def run_one(
    method: str,
    mode: str,
    n_tasks: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Median seconds per step and the steps' peak memory above a no-grad forward (MiB)."""
    model, X, Y = build(n_tasks, args.batch, kind=args.trunk)
    if mode == "torchjd":
        step, params = torchjd_step(model, method, X, Y)
    elif mode == "libmtl":
        step, params = libmtl_step(model, method, X, Y)
    else:
        step, params = ours_step(model, method, mode, X, Y, args.tasks_per_pass)
    opt = torch.optim.SGD(params, lr=0.01)

    def timed() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step()
        opt.step()
        return time.perf_counter() - start

    with torch.no_grad():
        model.calculate_loss(X, Y)  # the forward's buffers in the baseline, not the gradients
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed()  # warm-up (the batched trial, caches)
    times = [timed() for _ in range(args.steps)]
    while sum(times) < args.min_time and len(times) < MAX_STEPS:  # cheap steps: more of them
        times.append(timed())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 1024}


def in_fresh_process(
    method: str, mode: str, n_tasks: int, args: argparse.Namespace
) -> dict[str, Any]:
    """:func:`run_one` in a fresh process; ``{"error": its last line of stderr}`` if it fails."""
    cmd = [sys.executable, "-m", "bench.many_tasks", "--one", method, mode, str(n_tasks)]
    cmd += [
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--min-time",
        str(args.min_time),
    ]
    cmd += ["--tasks-per-pass", str(args.tasks_per_pass), "--trunk", args.trunk]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if out.returncode:  # reported in the table and the JSON, the other configurations go on
        return {"error": (out.stderr.strip().splitlines() or ["exit " + str(out.returncode)])[-1]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:6.2f}" if b else f"{'-':>6}"


HEADER = (
    f"{'T':>3} {'method':<10} {'mode':<14} {'s/step':>8} {'x sum':>6} "
    + " ".join(f"{'x ' + p:>8}" for p in PEERS)
    + f" {'peak MiB':>9} "
    + " ".join(f"{'M/' + p:>9}" for p in PEERS)
)


def print_rows(rows: Sequence[dict[str, Any]], base: dict[str, Any]) -> None:
    """One method's rows at one ``T``: time and peak against ``sum`` and against each peer."""
    peer = {r["mode"]: r for r in rows if r["mode"] in PEERS and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['tasks']:>3} {r['method']:<10} {r['mode']:<14} failed: {r['error']}")
            continue
        t, m = r["seconds"], r["peak_mib"]
        times = " ".join(f"{ratio(t, peer[p]['seconds']) if p in peer else '-':>8}" for p in PEERS)
        mems = " ".join(f"{ratio(m, peer[p]['peak_mib']) if p in peer else '-':>9}" for p in PEERS)
        print(
            f"{r['tasks']:>3} {r['method']:<10} {r['mode']:<14} {t:8.4f} "
            f"{ratio(t, base['seconds'])} {times} {m:9.1f} {mems}",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="gradient methods at many tasks")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--min-time", type=float, default=0.0, help="more steps until they took this long (s)"
    )
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
    rows: list[dict[str, Any]] = []
    print(HEADER)
    for n_tasks in args.tasks:
        base = {"tasks": n_tasks, "method": "sum", "mode": "-"}
        base.update(in_fresh_process("sum", "sum", n_tasks, args))
        rows.append(base)
        print_rows([base], base)
        for method in args.methods:
            mine = [
                {"tasks": n_tasks, "method": method, "mode": mode}
                | in_fresh_process(method, mode, n_tasks, args)
                for mode in args.modes
                if has_mode(method, mode)
            ]
            print_rows(mine, base)
            rows += mine
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
