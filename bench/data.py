"""Data at scale: out-of-core memory-mapped training, the cost of sampling schedulers, and (when
``bench/data_images.py`` exists) image-folder loading, as ratios measured in one run.

Part 1, out of core: a memory-mapped dataset of ``--rows`` x 64 float32 features plus int64
labels (default 16M rows: 4 GiB of features) is generated into a temporary directory; a small MLP
trains on it for ``--steps`` shuffled steps through the Trainer, in a fresh process whose peak
resident memory is measured, and the same model trains on an in-memory subset (``--subset``
rows, tensors) for the same steps in another fresh process. Targets: peak RSS < 1.5 GB, steps/s
>= 0.8x the in-memory run's.

Part 2, sampling cost: the seed tutorial (three datasets, batch 32) trained with each sampling
scheduler (``steps_per_epoch`` = the ``shuffled`` epoch's length) vs ``shuffled``, in
alternation, medians compared. Target: <= 1.02x.

Part 3: ``bench/data_images.py``'s ``run(num_workers_list)`` (images/s vs a plain DataLoader).

Run: ``python bench/data.py [--rows 16000000] [--steps 2000] [--repeats 5] [--quick]``. With
``--quick``: 1M rows (256 MiB) and fewer steps, for a smoke run; say so when quoting numbers.
Needs about ``rows x 264`` bytes of free disk in the temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 64


# ---------------------------------------------------------------- part 1: out of core


def generate(directory: Path, rows: int, chunk: int = 1 << 20) -> None:
    """``features.npy`` (rows x 64 float32) and ``label.npy`` (rows int64), written in chunks."""
    x = np.lib.format.open_memmap(
        directory / "features.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURES)
    )
    y = np.lib.format.open_memmap(directory / "label.npy", mode="w+", dtype=np.int64, shape=(rows,))
    rng = np.random.default_rng(0)
    w = rng.normal(size=FEATURES).astype(np.float32)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        block = rng.standard_normal((stop - start, FEATURES), dtype=np.float32)
        x[start:stop] = block
        y[start:stop] = (block @ w > 0).astype(np.int64)
        x.flush()
        y.flush()
    del x, y


def small_model() -> Any:
    from mtlgraph import MultitaskClassifier, Operation, Task

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU())
    task = Task(
        "t",
        {"trunk": trunk, "head": nn.Linear(64, 2)},
        [Operation("trunk", [("_input_", "x")]), Operation("head", ["trunk"])],
    )
    return MultitaskClassifier([task])


def child(directory: str, mode: str, steps: int, subset: int, batch: int) -> dict[str, float]:
    """One measured training run in this (fresh) process: steps/s and peak RSS."""
    from mtlgraph import DictDataLoader, DictDataset, Trainer

    torch.set_num_threads(1)
    x = np.load(Path(directory) / "features.npy", mmap_mode="r")
    y = np.load(Path(directory) / "label.npy", mmap_mode="r")
    if mode == "memory":
        x, y = torch.from_numpy(np.array(x[:subset])), torch.from_numpy(np.array(y[:subset]))
    ds = DictDataset("big", "train", {"x": x}, {"t": y})
    loader = DictDataLoader(ds, batch_size=batch, shuffle=True, seed=1)
    trainer = Trainer(
        n_epochs=1,
        lr=0.01,
        progress_bar=False,
        batch_scheduler="uniform",
        steps_per_epoch=steps,
        evaluation_freq=0,
    )
    model = small_model()
    start = time.perf_counter()
    trainer.fit(model, [loader])
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "peak_rss_gb": peak_rss() / 1e9}


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss would carry the parent's
    peak over fork + exec on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def measure(directory: Path, mode: str, steps: int, subset: int, batch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--dir", str(directory)]
    cmd += ["--steps", str(steps), "--subset", str(subset), "--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def out_of_core(rows: int, steps: int, subset: int, batch: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mtlgraph-bench-data-") as tmp:
        directory = Path(tmp)
        t = time.perf_counter()
        generate(directory, rows)
        size = sum(f.stat().st_size for f in directory.iterdir()) / 2**30
        print(f"generated {rows:,} rows ({size:.2f} GiB) in {time.perf_counter() - t:.0f} s")
        mapped, memory = [], []
        for _ in range(repeats):  # alternate, medians
            mapped.append(measure(directory, "memmap", steps, subset, batch))
            memory.append(measure(directory, "memory", steps, subset, batch))
        m_speed = statistics.median(r["steps_per_s"] for r in mapped)
        r_speed = statistics.median(r["steps_per_s"] for r in memory)
        m_rss = max(r["peak_rss_gb"] for r in mapped)
        r_rss = max(r["peak_rss_gb"] for r in memory)
        print(
            f"out of core: memmap {m_speed:.0f} steps/s, peak RSS {m_rss:.2f} GB (target < 1.5) | "
            f"in-memory subset of {subset:,} rows {r_speed:.0f} steps/s, peak RSS {r_rss:.2f} GB"
        )
        print(f"  ratio memmap / in-memory steps/s: {m_speed / r_speed:.3f}x (target >= 0.8)")


# ---------------------------------------------------------------- part 2: sampling cost


SAMPLERS = ("uniform", "proportional", "temperature", "annealed", "weighted")


def tutorial_loaders() -> list[Any]:
    from mtlgraph import DictDataLoader, DictDataset
    from mtlgraph.data.synthetic import (
        make_circle_dataset,
        make_inv_circle_dataset,
        make_square_dataset,
    )

    loaders = []
    for name, maker in (
        ("circle", make_circle_dataset),
        ("square", make_square_dataset),
        ("inv_circle", make_inv_circle_dataset),
    ):
        (x, y), _, _ = maker(1000, 1.0)
        ds = DictDataset(f"{name}Dataset", "train", {"x": torch.from_numpy(x)}, {name: y})
        loaders.append(DictDataLoader(ds, batch_size=32, shuffle=True, seed=1))
    return loaders


def tutorial_model() -> Any:
    from mtlgraph import MultitaskClassifier, Operation, Task

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    return MultitaskClassifier(
        [
            Task(
                n,
                {"base_mlp": trunk, f"{n}_head": nn.Linear(4, 2)},
                [Operation("base_mlp", [("_input_", "x")]), Operation(f"{n}_head", ["base_mlp"])],
            )
            for n in ("circle", "square", "inv_circle")
        ]
    )


def fit_seconds(scheduler: str, n_epochs: int) -> float:
    from mtlgraph import Trainer

    loaders = tutorial_loaders()
    spec: Any = scheduler
    if scheduler == "weighted":
        spec = {"name": "weighted", "weights": {dl.dataset.name: 1.0 for dl in loaders}}
    extra = {} if scheduler == "shuffled" else {"steps_per_epoch": sum(len(dl) for dl in loaders)}
    trainer = Trainer(
        n_epochs=n_epochs,
        lr=0.02,
        progress_bar=False,
        batch_scheduler=spec,
        evaluation_freq=0,
        **extra,
    )
    model = tutorial_model()
    start = time.perf_counter()
    trainer.fit(model, loaders)
    return time.perf_counter() - start


def sampling_cost(n_epochs: int, repeats: int) -> None:
    times: dict[str, list[float]] = {s: [] for s in ("shuffled", *SAMPLERS)}
    fit_seconds("shuffled", 1)  # warm-up
    for _ in range(repeats):
        for s in times:
            times[s].append(fit_seconds(s, n_epochs))
    base = statistics.median(times["shuffled"])
    print(f"sampling cost on the tutorial ({n_epochs} epochs, median of {repeats}):")
    print(f"  shuffled {base:.3f} s")
    for s in SAMPLERS:
        med = statistics.median(times[s])
        print(f"  {s:<13} {med:.3f} s  ratio {med / base:.3f}x (target <= 1.02)")


# ---------------------------------------------------------------- part 3: images


def images(workers: list[int]) -> None:
    path = ROOT / "bench" / "data_images.py"
    if not path.is_file():
        print("image folder: bench/data_images.py is absent; skipped")
        return
    spec = importlib.util.spec_from_file_location("data_images", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print("image folder:", json.dumps(module.run(workers), indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16_000_000, help="rows of the memmap")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run")
    parser.add_argument("--subset", type=int, default=1_000_000, help="in-memory subset rows")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="tutorial epochs (part 2)")
    parser.add_argument("--quick", action="store_true", help="1M rows, fewer steps")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memmap", "sampling", "images"])
    parser.add_argument("--child", choices=["memmap", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.dir, args.child, args.steps, args.subset, args.batch)))
        return
    if args.quick:
        args.rows, args.steps, args.subset, args.repeats, args.epochs = (
            1_000_000,
            500,
            200_000,
            1,
            3,
        )
    if "memmap" not in args.skip:
        out_of_core(args.rows, args.steps, min(args.subset, args.rows), args.batch, args.repeats)
    if "sampling" not in args.skip:
        sampling_cost(args.epochs, args.repeats)
    if "images" not in args.skip:
        images([0, 1, 2])


if __name__ == "__main__":
    main()
