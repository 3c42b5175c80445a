"""Data at scale: out-of-core memory-mapped training, the cost of sampling schedulers, and (when
``bench/data_images.py`` exists) image-folder loading, as ratios measured in one run.

Part 1, out of core: a memory-mapped dataset of ``--gb`` GiB of float32 features (64 a row) plus
int64 labels is generated (into ``--dir``, kept for the next run, or a temporary directory); a
small MLP trains on it for ``--steps`` shuffled steps (batch ``--batch``) through the Trainer,
once per ``--workers`` setting, each in a fresh process, alternating with the same model trained
on an in-memory subset (``--subset`` rows, tensors, ``num_workers=0``: its fastest path) for the
same steps. Speed is steps/s from step ``--warmup`` on (the steady state: an epoch's start, a
16M-row permutation and the workers' start, is paid once per 65,536 steps at 4 GiB); memory is
the peak over the run of the process's and its workers' resident memory (summed RSS, which
counts pages the forked workers share with it once per process, sampled every 20 ms, and summed
PSS, which does not, sampled every second). CPU is the training process's own, per step.
``--shuffle-block K`` adds, per ``--workers`` setting, a mapped run with
``DictDataLoader(shuffle_block=K)`` (a block shuffle: a different sampling distribution, see
docs/data.md; the in-memory reference keeps the exact shuffle).
``--cold`` evicts the files from the page cache before every mapped run with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed, nothing else on the machine is evicted;
pages some process maps stay: it prints how much stayed, by ``fincore`` where installed).
Targets: peak RSS < 1.5 GB, steps/s >= 0.8x the in-memory run's. Medians over ``--repeats``;
the machine is shared, so compare the ratios of one run, not absolute numbers across runs.

Part 2, sampling cost: the seed tutorial (three datasets, batch 32) trained with each sampling
scheduler (``steps_per_epoch`` = the ``shuffled`` epoch's length) vs ``shuffled``, in
alternation, medians compared. Target: <= 1.02x.

Part 3: ``bench/data_images.py``'s ``run(num_workers_list)`` (images/s vs a plain DataLoader).

Run: ``python bench/data.py [--gb 4] [--workers 0 1 2] [--cold] [--steps 2000] [--repeats 3]
[--dir DIR] [--shuffle-block 16] [--skip sampling images]``. With ``--quick``: 0.25 GiB and
fewer steps, for a smoke run; say so when quoting numbers. Needs about ``1.03 x --gb`` GiB of
free disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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


class TreeMemory:
    """Peak resident memory of this process plus its children (DataLoader workers), sampled:
    RSS every ``every`` seconds, PSS (``smaps_rollup``: about 5 ms a read here) every second."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.peak_rss, self.peak_pss = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, peak_rss())  # a peak between two samples

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            pids = [os.getpid(), *children()]
            rss = sum(_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
            self.peak_rss = max(self.peak_rss, rss)
            if tick % int(1 / self.every) == 0:
                pss = sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.every)


def children() -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:  # a thread that just ended
            continue
    return pids


def _kib(path: str, key: str) -> int:
    """A ``key: N kB`` line of ``path`` in bytes (0 for a process that just ended)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def child(args: argparse.Namespace) -> dict[str, float]:
    """One measured training run in this (fresh) process: steady steps/s and peak memory."""
    from mtlgraph import DictDataLoader, DictDataset, Hook, Trainer

    torch.set_num_threads(1)
    x = np.load(Path(args.dir) / "features.npy", mmap_mode="r")
    y = np.load(Path(args.dir) / "label.npy", mmap_mode="r")
    workers = 0
    extra: dict[str, Any] = {}
    if args.child == "memory":
        x = torch.from_numpy(np.array(x[: args.subset]))
        y = torch.from_numpy(np.array(y[: args.subset]))
    else:
        workers = int(args.child.removeprefix("memmap").removeprefix("block"))
        if args.child.startswith("block"):
            extra["shuffle_block"] = args.shuffle_block
    ds = DictDataset("big", "train", {"x": x}, {"t": y})
    if workers:
        extra.update(num_workers=workers, persistent_workers=True)
    loader = DictDataLoader(ds, batch_size=args.batch, shuffle=True, seed=1, **extra)
    times: dict[int, tuple[float, float]] = {}

    class Clock(Hook):
        def on_step_end(self, run: Any) -> None:
            if run.global_step in (args.warmup, args.steps):
                times[run.global_step] = (time.perf_counter(), time.process_time())

    trainer = Trainer(
        n_epochs=1,
        lr=0.01,
        progress_bar=False,
        batch_scheduler="uniform",
        steps_per_epoch=args.steps,
        evaluation_freq=0,
        hooks=[Clock()],
    )
    model = small_model()
    start = time.perf_counter()
    with TreeMemory() as memory:
        trainer.fit(model, [loader])
    seconds = time.perf_counter() - start
    steps = args.steps - args.warmup
    (wall0, cpu0), (wall1, cpu1) = times[args.warmup], times[args.steps]
    return {
        "steps_per_s": steps / (wall1 - wall0),
        "total_steps_per_s": args.steps / seconds,
        "cpu_ms_per_step": (cpu1 - cpu0) / steps * 1e3,  # this process's, workers not included
        "peak_rss_gb": memory.peak_rss / 1e9,
        "peak_pss_gb": memory.peak_pss / 1e9,
    }


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss would carry the parent's
    peak over fork + exec on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def evict(directory: Path) -> str:
    """Drop the files' pages from the page cache (``POSIX_FADV_DONTNEED``); what stays cached."""
    for f in ("features.npy", "label.npy"):
        fd = os.open(directory / f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return cached(directory / "features.npy")


def cached(path: Path) -> str:
    """How much of ``path`` is in the page cache (by ``fincore``), or ``"unknown"``."""
    if shutil.which("fincore") is None:
        return "unknown"
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES,SIZE", str(path)], capture_output=True, text=True
    )
    try:
        res, size = (int(v) for v in out.stdout.split())
    except ValueError:
        return "unknown"
    return f"{res / size:.1%}"


def measure(directory: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--dir", str(directory)]
    cmd += ["--steps", str(args.steps), "--subset", str(args.subset), "--batch", str(args.batch)]
    cmd += ["--warmup", str(args.warmup), "--shuffle-block", str(args.shuffle_block)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def out_of_core(args: argparse.Namespace) -> None:
    rows = int(args.gb * 2**30) // (FEATURES * 4)
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mtlgraph-bench-data-")
    directory = Path(args.dir or tmp.name)  # type: ignore[union-attr]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        have = directory / "features.npy"
        if not have.is_file() or np.load(have, mmap_mode="r").shape[0] != rows:
            t = time.perf_counter()
            generate(directory, rows)
            print(f"generated {rows:,} rows in {time.perf_counter() - t:.0f} s")
        size = (directory / "features.npy").stat().st_size / 2**30
        print(
            f"out of core: {rows:,} rows, {size:.2f} GiB of features, batch {args.batch}, "
            f"{args.steps} steps (speed from step {args.warmup}), "
            f"{'cold (evicted before each mapped run)' if args.cold else 'warm page cache'}"
        )
        modes = [f"memmap{w}" for w in args.workers]
        if args.shuffle_block > 1:
            modes += [f"block{w}" for w in args.workers]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in ["memory", *modes]}
        for _ in range(args.repeats):  # alternate, medians
            for mode in modes:
                if args.cold:
                    print(f"  evicted; still cached: {evict(directory)}")
                results[mode].append(measure(directory, mode, args))
            results["memory"].append(measure(directory, "memory", args))
        report(results, modes, args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def report(results: dict[str, list[dict[str, float]]], modes: list[str], args: Any) -> None:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    def peak(mode: str, key: str) -> float:
        return max(r[key] for r in results[mode])

    base = med("memory", "steps_per_s")
    for mode in ["memory", *modes]:
        label = f"in-memory {args.subset:,} rows"
        if mode.startswith("memmap"):
            label = f"memmap, num_workers={mode.removeprefix('memmap')}"
        elif mode.startswith("block"):
            label = f"blocks of {args.shuffle_block}, workers={mode.removeprefix('block')}"
        runs = ", ".join(f"{r['steps_per_s']:.0f}" for r in results[mode])
        print(
            f"  {label:<26} {med(mode, 'steps_per_s'):5.0f} steps/s (runs {runs}), "
            f"ratio {med(mode, 'steps_per_s') / base:.3f}x (target >= 0.8), "
            f"main CPU {med(mode, 'cpu_ms_per_step'):.2f} ms/step, "
            f"peak RSS {peak(mode, 'peak_rss_gb'):.2f} GB / PSS {peak(mode, 'peak_pss_gb'):.2f} "
            "GB (target < 1.5)"
        )


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
    parser.add_argument("--gb", type=float, default=4.0, help="GiB of memory-mapped features")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="mapped runs")
    parser.add_argument("--cold", action="store_true", help="evict the files before mapped runs")
    parser.add_argument("--dir", help="keep the generated files here (reused when present)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the clock starts")
    parser.add_argument("--subset", type=int, default=1_000_000, help="in-memory subset rows")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--shuffle-block", type=int, default=1, help="also mapped runs with this shuffle_block"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="tutorial epochs (part 2)")
    parser.add_argument("--quick", action="store_true", help="0.25 GiB, fewer steps")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memmap", "sampling", "images"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.gb, args.steps, args.subset, args.repeats, args.epochs = (0.25, 500, 200_000, 1, 3)
    args.subset = min(args.subset, int(args.gb * 2**30) // (FEATURES * 4))
    if "memmap" not in args.skip:
        out_of_core(args)
    if "sampling" not in args.skip:
        sampling_cost(args.epochs, args.repeats)
    if "images" not in args.skip:
        images([0, 1, 2])


if __name__ == "__main__":
    main()
