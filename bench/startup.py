"""Start-up time: ``import mtlgraph`` and the command line, each in a fresh process.

Every case runs as its own subprocess (so nothing is cached in this one), ``--repeats`` times, in
alternation (machine drift hits every case alike); medians are compared with ``import torch``:

- ``python -c "import torch"``: the reference (mtlgraph cannot be faster than its dependency);
- ``python -c "import mtlgraph"``: the package alone (lazy: it imports nothing heavy);
- ``python -c "from mtlgraph import *"``: every public name, so every module behind them;
- ``python -m mtlgraph --help`` and ``--version``; and the ``mtlgraph`` console script when it is
  installed next to this Python.

Run: ``python bench/startup.py [--repeats 7]``. Prints a table and ratios; the targets:
``--help``/``--version`` < 0.5 s, ``from mtlgraph import *`` <= 1.2x ``import torch``. The exit
status is 0 whatever the numbers (a busy machine is slow); read the table. Find what is slow with
``python -X importtime -c "from mtlgraph import *" 2>&1 | sort -t'|' -k2 -n | tail``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_TARGET_S = 0.5  # --help and --version answer faster than this
IMPORT_TARGET = 1.2  # from mtlgraph import * costs at most this many times import torch


def cases() -> dict[str, list[str]]:
    """Name -> command line; the console script only when it is installed."""
    python = sys.executable
    out = {
        "import torch": [python, "-c", "import torch"],
        "import mtlgraph": [python, "-c", "import mtlgraph"],
        "from mtlgraph import *": [python, "-c", "from mtlgraph import *"],
        "python -m mtlgraph --help": [python, "-m", "mtlgraph", "--help"],
        "python -m mtlgraph --version": [python, "-m", "mtlgraph", "--version"],
    }
    script = Path(python).parent / "mtlgraph"
    if script.is_file() and os.access(script, os.X_OK):
        out["mtlgraph --help"] = [str(script), "--help"]
        out["mtlgraph --version"] = [str(script), "--version"]
    return out


def timed(cmd: list[str]) -> float:
    """Wall-clock seconds of one run of ``cmd`` (output discarded; a failure raises)."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # this checkout's mtlgraph
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - t


def measure(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every command, ``repeats`` times, the commands in alternation."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for cmd in commands.values():  # one warm-up each: the first run fills the OS file cache
        timed(cmd)
    for _ in range(repeats):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    return times


def target(name: str, median: float, torch_median: float) -> str:
    """The case's target and whether the median meets it."""
    if name.endswith(("--help", "--version")):
        return f"< {CLI_TARGET_S} s: {'met' if median < CLI_TARGET_S else 'MISSED'}"
    if name == "from mtlgraph import *":
        ok = median <= IMPORT_TARGET * torch_median
        return f"<= {IMPORT_TARGET}x import torch: {'met' if ok else 'MISSED'}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description="mtlgraph start-up time benchmark")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each case (median)")
    args = parser.parse_args()
    times = measure(cases(), args.repeats)
    torch_median = statistics.median(times["import torch"])
    torch_min = min(times["import torch"])
    width = max(map(len, times))
    header = f"{'case'.ljust(width)}  median     min  {'vs import torch (minima)':<20}  target"
    print(header)
    for name, ts in times.items():
        median = statistics.median(ts)
        ratio = f"{median / torch_median:.2f}x  ({min(ts) / torch_min:.2f}x)"
        print(
            f"{name.ljust(width)}  {median:5.3f}s  {min(ts):5.3f}s  {ratio:<20}  "
            f"{target(name, median, torch_median)}"
        )
    print(f"({args.repeats} runs each, in fresh processes; {sys.executable})")


if __name__ == "__main__":
    main()
