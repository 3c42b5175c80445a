"""Framework overhead: mtlgraph's Trainer vs a hand-written PyTorch loop, in one run.

Part 1, the tutorial: the seed tutorial's three tasks (circle, square, inv_circle), shared
``base_mlp`` trunk, batch 32, Adam lr 0.02, 10 epochs, the same initial weights. Three fits are
repeated in alternation and their medians compared:

- *raw*: a hand-written loop with the same batch order as mtlgraph's and the Adam update
  mtlgraph picks on the CPU (``fused=True``); final weights are checked for bit-identity, so both
  loops really do the same work;
- *tight*: the fastest plain PyTorch loop for this data: batches sliced once before training,
  each epoch's order one ``torch.randperm``, no DataLoader (the contract's reference,
  ``mtlgraph/tight <= 1.0``), with PyTorch's default Adam (on the CPU, a Python loop over the
  parameters); and the same loop with ``Adam(fused=True)``, the update mtlgraph picks on the CPU
  (equal to float rounding): against it, the ratio is the loop's own overhead;
- *mtlgraph*: ``Trainer.fit``.

``--profile`` adds the framework's own Python time per optimizer step: one mtlgraph fit under
``cProfile``, the ``tottime`` of every function defined in the ``mtlgraph`` package, divided by
the steps (cProfile's own cost inflates it a little).

Part 2, scaling: per-step time of a model holding 4 tasks vs one holding 1,000 tasks (shared
trunk, a head per task), both trained on batches of the same 4 tasks; and the time to build the
1,000-task model.

Part 3, compute-bound: a wide MLP (batch 256), where the framework's share should vanish.

Run: ``python bench/overhead.py [--repeats 5] [--quick] [--profile] [--tutorial-only]``.
Prints ratios; targets from DESIGN.md: tutorial mtlgraph/tight <= 1.0 and framework Python
<= 80 us a step, wide MLP <= 1.03x, 1,000 vs 4 tasks <= 1.10x, build < 1 s.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.data.synthetic import (
    make_circle_dataset,
    make_inv_circle_dataset,
    make_square_dataset,
)


def tutorial_model(
    seed: int, names: list[str], width: int = 8, in_dim: int = 2
) -> MultitaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, 4), nn.ReLU())
    tasks = [
        Task(
            f"{n}_task",
            {"base_mlp": trunk, f"{n}_head": nn.Linear(4, 2)},
            [
                Operation("base_mlp", [("_input_", f"{n}_data")]),
                Operation(f"{n}_head", ["base_mlp"]),
            ],
        )
        for n in names
    ]
    return MultitaskClassifier(tasks)


def trunk_and_adam(
    model: MultitaskClassifier, heads: list[nn.Module], lr: float, fused: bool | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The shared trunk, and Adam over the trunk's and the heads' parameters (``fused``:
    PyTorch's default, the per-parameter loop on the CPU, unless set)."""
    trunk = model.module_pool["base_mlp"]
    params = list(trunk.parameters()) + [p for h in heads for p in h.parameters()]
    return trunk, torch.optim.Adam(params, lr=lr, fused=fused)


def raw_fit(
    model: MultitaskClassifier,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    heads: list[nn.Module],
    n_epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """The hand-written loop: slices, forward, cross-entropy, backward, fused Adam."""
    trunk, opt = trunk_and_adam(model, heads, lr, fused=True)
    counts = [-(-len(x) // batch_size) for x, _ in data]
    rng = np.random.Generator(np.random.PCG64(seed))
    for _ in range(n_epochs):
        order = rng.permutation(np.repeat(np.arange(len(data)), counts)).tolist()
        pos = [0] * len(data)
        for i in order:
            x, y = data[i]
            s = pos[i]
            pos[i] = s + batch_size
            loss = F.cross_entropy(heads[i](trunk(x[s : s + batch_size])), y[s : s + batch_size])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def tight_fit(
    model: MultitaskClassifier,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    heads: list[nn.Module],
    n_epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    fused: bool | None = None,
) -> None:
    """The tight hand-written loop: batches sliced once, a ``torch.randperm`` order per epoch,
    no DataLoader; forward, cross-entropy, backward, Adam (``fused=True``: the update mtlgraph
    picks on the CPU, one kernel call a step)."""
    trunk, opt = trunk_and_adam(model, heads, lr, fused)
    batches = [
        (x[s : s + batch_size], y[s : s + batch_size], head)
        for (x, y), head in zip(data, heads, strict=True)
        for s in range(0, len(x), batch_size)
    ]
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_epochs):
        for i in torch.randperm(len(batches), generator=g).tolist():
            x, y, head = batches[i]
            loss = F.cross_entropy(head(trunk(x)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def mtl_fit(
    model: MultitaskClassifier, loaders: list[DictDataLoader], n_epochs: int, lr: float, seed: int
) -> None:
    Trainer(n_epochs=n_epochs, lr=lr, seed=seed, progress_bar=False).fit(model, loaders)


def tutorial_data(names: list[str], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    makers = {
        "circle": make_circle_dataset,
        "square": make_square_dataset,
        "inv_circle": make_inv_circle_dataset,
    }
    out = []
    for name in names:
        (X, Y), _, _ = makers[name](n, 1.0)
        out.append((torch.from_numpy(X), torch.from_numpy(Y)))
    return out


def loaders_for(names: list[str], data: list, batch_size: int) -> list[DictDataLoader]:
    return [
        DictDataLoader(
            DictDataset(f"{n}Dataset", "train", {f"{n}_data": x}, {f"{n}_task": y}),
            batch_size=batch_size,
        )
        for n, (x, y) in zip(names, data, strict=True)
    ]


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def compare(
    names: list[str], n: int, width: int, in_dim: int, batch_size: int, n_epochs: int, repeats: int
) -> tuple[dict[str, list[float]], bool]:
    """Seconds of the raw, tight (PyTorch's default Adam, and the ``fused`` one) and mtlgraph
    fits on identical setups, in alternation; whether raw and mtlgraph end with identical
    weights."""
    lr, seed = 0.02, 0
    if in_dim == 2:
        data = tutorial_data(names, n)
    else:
        g = torch.Generator().manual_seed(1)
        data = []
        for _ in names:
            x = torch.randn(n, in_dim, generator=g)
            data.append((x, (x[:, 0] > 0).long()))
    loaders = loaders_for(names, data, batch_size)
    init = tutorial_model(seed, names, width, in_dim)
    times: dict[str, list[float]] = {"raw": [], "tight": [], "tight_fused": [], "mtlgraph": []}
    identical = True
    for _ in range(repeats):
        raw_model, mtl_model = copy.deepcopy(init), copy.deepcopy(init)
        heads = [raw_model.module_pool[f"{nm}_head"] for nm in names]
        times["raw"].append(timed(raw_fit, raw_model, data, heads, n_epochs, batch_size, lr, seed))
        for key, fused in (("tight", None), ("tight_fused", True)):
            tight_model = copy.deepcopy(init)
            tight_heads = [tight_model.module_pool[f"{nm}_head"] for nm in names]
            args = (tight_model, data, tight_heads, n_epochs, batch_size, lr, seed, fused)
            times[key].append(timed(tight_fit, *args))
        times["mtlgraph"].append(timed(mtl_fit, mtl_model, loaders, n_epochs, lr, seed))
        identical &= all(
            torch.equal(a, b)
            for a, b in zip(raw_model.parameters(), mtl_model.parameters(), strict=True)
        )
    return times, identical


def framework_us_per_step(names: list[str], n: int, n_epochs: int) -> tuple[float, float]:
    """Microseconds per optimizer step spent in functions of the ``mtlgraph`` package
    (``tottime`` under ``cProfile``), on the tutorial, and the calls of such functions per step
    (deterministic: the machine's load does not change it)."""
    data = tutorial_data(names, n)
    loaders = loaders_for(names, data, 32)
    model = tutorial_model(0, names)
    trainer = Trainer(n_epochs=n_epochs, lr=0.02, seed=0, progress_bar=False)
    profile = cProfile.Profile()
    profile.runcall(trainer.fit, model, loaders)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = [v for (file, _, _), v in stats.items() if "/mtlgraph/" in file]
    steps = trainer.global_step
    return sum(v[2] for v in ours) / steps * 1e6, sum(v[1] for v in ours) / steps


def scaling_model(n_tasks: int) -> tuple[MultitaskClassifier, float]:
    """A shared trunk and one head per task; returns the model and its build seconds."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
    tasks = [
        Task(
            f"task{i}",
            {"trunk": trunk, f"head{i}": nn.Linear(16, 2)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"head{i}", ["trunk"])],
        )
        for i in range(n_tasks)
    ]
    model = MultitaskClassifier(tasks)
    return model, time.perf_counter() - t0


def scaling(steps: int, repeats: int) -> tuple[list[float], list[float], float]:
    """Seconds per step of a 4-task and a 1,000-task model trained on the same 4 tasks' batches
    (timed in alternation, so machine drift hits both alike), and the 1,000-task build time."""
    small, _ = scaling_model(4)
    big, build = scaling_model(1000)
    g = torch.Generator().manual_seed(0)
    loaders = []
    for i in range(4):
        x = torch.randn(32 * steps // 4, 16, generator=g)
        ds = DictDataset(f"d{i}", "train", {"x": x}, {f"task{i}": (x[:, i] > 0).long()})
        loaders.append(DictDataLoader(ds, batch_size=32))
    small_t, big_t = [], []
    for _ in range(repeats):
        small_t.append(timed(mtl_fit, small, loaders, 1, 0.01, 0) / steps)
        big_t.append(timed(mtl_fit, big, loaders, 1, 0.01, 0) / steps)
    return small_t, big_t, build


def ratios(ours: list[float], reference: list[float]) -> str:
    """The ratio of medians (the contract's measure) and of minima (least disturbed by a noisy
    machine: other work only ever adds time)."""
    med = statistics.median(ours) / statistics.median(reference)
    low = min(ours) / min(reference)
    return f"ratio {med:.3f} (of minima {low:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description="mtlgraph framework overhead benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="framework Python us per step")
    parser.add_argument("--tutorial-only", action="store_true", help="part 1 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs = 2 if args.quick else 10
    names = ["circle", "square", "inv_circle"]

    times, same = compare(names, 1000, 8, 2, 32, epochs, args.repeats)
    raw, tight, mtl = times["raw"], times["tight"], times["mtlgraph"]
    print(
        f"tutorial fit ({epochs} epochs, batch 32): tight {statistics.median(tight):.3f}s  "
        f"raw {statistics.median(raw):.3f}s  mtlgraph {statistics.median(mtl):.3f}s\n"
        f"  mtlgraph/tight {ratios(mtl, tight)} (target <= 1.0)\n"
        f"  mtlgraph/tight with fused Adam {ratios(mtl, times['tight_fused'])} "
        "(the loop alone: the same optimizer kernels)\n"
        f"  mtlgraph/raw {ratios(mtl, raw)}  identical weights to raw: {same}"
    )
    if args.profile:
        us, calls = framework_us_per_step(names, 1000, epochs)
        print(
            f"  framework Python per step (cProfile): {us:.0f}us (target <= 80), "
            f"{calls:.1f} calls of mtlgraph functions"
        )
    if args.tutorial_only:
        return

    wide_epochs = 1 if args.quick else 3
    times, same = compare(names[:2], 2048, 1024, 512, 256, wide_epochs, args.repeats)
    raw, mtl = times["raw"], times["mtlgraph"]
    print(
        f"wide MLP fit (batch 256): raw {statistics.median(raw):.3f}s  "
        f"mtlgraph {statistics.median(mtl):.3f}s  {ratios(mtl, raw)} (target <= 1.03)  "
        f"identical weights: {same}"
    )

    steps = 200 if args.quick else 800
    small, big, build = scaling(steps, args.repeats)
    print(
        f"per-step time, 4-task model {statistics.median(small) * 1e6:.0f}us, 1000-task model "
        f"{statistics.median(big) * 1e6:.0f}us: {ratios(big, small)} (target <= 1.10)"
    )
    print(f"building the 1000-task model: {build:.3f}s (target < 1 s)")


if __name__ == "__main__":
    main()
