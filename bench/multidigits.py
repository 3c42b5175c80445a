"""MultiDigits: a two-task benchmark on real handwritten digits, on CPU, in a few minutes.

Built from scikit-learn's bundled 8x8 digits (1,797 scans, no download) the way MultiMNIST
(Sener & Koltun, NeurIPS 2018) is built from MNIST: two digits are overlaid on one 16x16 canvas,
the *left* one shifted up-left (top-left corner at 0..3 px) and the *right* one down-right
(top-left corner at 5..8 px), merged with a pixel-wise maximum, so they overlap by up to 6 px.
Tasks: ``left`` (the class of the up-left digit) and ``right`` (the down-right one).

The source images are split into train / valid / test (60 / 20 / 20, a fixed permutation)
*before* any pair is made, so no scan appears in two splits; pairs are then drawn within each
split (the two digits of a pair are different scans). Pixels are scaled to 0..1, then
standardised with the training images' mean and standard deviation.

Model (the MultiMNIST one, smaller): a LeNet-style shared encoder (two 5x5 conv + max-pool
blocks, a 50-unit linear layer) and one two-layer head per task. Adam, fixed epochs, the same
initial weights and the same batch order for every method of a seed.

For single-task baselines (one model per task), every balancer in ``mtlgraph``'s ``BALANCERS``
registry (iterated, so new balancers appear by themselves; ``sum`` is equal weights), it
reports the test accuracy of each task (mean ± std over seeds), Δm% against single-task
(``Δm = 1/T Σ_t (−1)^{l_t} (M_t − M_single,t) / M_single,t · 100``, with ``l_t = 0`` for
accuracy: higher is better, so positive Δm is better than single-task), the median seconds per
optimizer step and the training seconds per epoch (sum of the step times: no evaluation, no
start-up). ``--peers`` adds LibMTL and TorchJD on the same data, model, batches and seeds
(:mod:`bench.peers`).

Gradient modes: each gradient balancer's plain row takes the task gradients on the shared
parameters (``gradients: parameters``, the default); for each mode of ``--modes``
(``representation``, ``gram``; default both, none with ``--quick``) every balancer whose
constructor accepts it gets one more row, ``<name> [<mode>]``. ``gram`` gives the same update as
``parameters`` up to float rounding, so its row mainly times the Gram way.

Run (from the repository root):
``python -m bench.multidigits [--quick] [--seeds 0 1 2] [--modes representation gram] [--peers]
[--threads 1] [--json bench/results/multidigits.json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` and the worktree importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.balancing import BALANCERS
from mtlgraph.exceptions import ConfigError
from mtlgraph.training import trainer as trainer_module
from mtlgraph.training.step import TrainStep

TASKS = ("left", "right")
EXTRA_MODES = ("representation", "gram")  # gradient modes besides the default "parameters"
CANVAS = 16  # canvas side, px
LEFT_SHIFTS = (0, 4)  # range of the left digit's top-left corner (row and column), px
RIGHT_SHIFTS = (5, 9)  # same for the right digit
SPLIT_FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}  # of the 1,797 source scans


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run (``--quick`` shrinks them)."""

    pairs: Mapping[str, int] = field(
        default_factory=lambda: {"train": 2000, "valid": 400, "test": 1000}
    )  # overlaid images per split
    epochs: int = 5  # passes over the training pairs
    batch_size: int = 32  # pairs per optimizer step
    lr: float = 3e-3  # Adam learning rate
    data_seed: int = 0  # seed of the source split and of the pairs (fixed across model seeds)


QUICK = Config(pairs={"train": 1000, "valid": 200, "test": 500}, epochs=5)


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """One split of MultiDigits: images and labels, with the source scan of each digit."""

    images: torch.Tensor  # (n, 1, CANVAS, CANVAS), float32, standardised with train mean / std
    labels: dict[str, torch.Tensor]  # task -> (n,) int64
    sources: dict[str, np.ndarray]  # task -> (n,) index of the source scan in load_digits()


def source_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets of the ``n`` source scans per split (a fixed permutation)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = round(SPLIT_FRACTIONS["train"] * n)
    n_valid = round(SPLIT_FRACTIONS["valid"] * n)
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid :]),
    }


def overlay(left: np.ndarray, right: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two 8x8 digits on one canvas: left shifted up-left, right down-right, pixel-wise max."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    r, c = rng.integers(*LEFT_SHIFTS, size=2)
    canvas[r : r + 8, c : c + 8] = left
    r, c = rng.integers(*RIGHT_SHIFTS, size=2)
    canvas[r : r + 8, c : c + 8] = np.maximum(canvas[r : r + 8, c : c + 8], right)
    return canvas


def make_multidigits(config: Config = Config()) -> dict[str, Split]:
    """MultiDigits pairs for each split (deterministic given ``config.data_seed``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8), 0..16 -> 0..1
    targets = digits.target.astype(np.int64)
    rng = np.random.default_rng(config.data_seed)
    out = {}
    for split, pool in source_split(len(images), config.data_seed).items():
        n = config.pairs[split]
        left = rng.choice(pool, size=n)
        right = rng.choice(pool, size=n)
        clash = left == right
        while clash.any():  # two different scans per pair
            right[clash] = rng.choice(pool, size=int(clash.sum()))
            clash = left == right
        canvases = np.stack(
            [overlay(images[i], images[j], rng) for i, j in zip(left, right, strict=True)]
        )
        out[split] = Split(
            images=torch.from_numpy(canvases).unsqueeze(1),
            labels={
                "left": torch.from_numpy(targets[left]),
                "right": torch.from_numpy(targets[right]),
            },
            sources={"left": left, "right": right},
        )
    # standardise with the training images' mean and std (learning is much faster than on 0..1)
    mean, std = out["train"].images.mean(), out["train"].images.std()
    for part in out.values():
        part.images = (part.images - mean) / std
    return out


def loaders(
    data: Mapping[str, Split], tasks: Sequence[str], config: Config, seed: int
) -> list[DictDataLoader]:
    """One loader per split labelling ``tasks``; training order from ``seed`` (epoch e: seed+e)."""
    out = []
    for split, part in data.items():
        ds = DictDataset(
            "multidigits", split, {"image": part.images}, {t: part.labels[t] for t in tasks}
        )
        train = split == "train"
        out.append(
            DictDataLoader(
                ds, batch_size=config.batch_size if train else 512, shuffle=train, seed=seed
            )
        )
    return out


# ---------------------------------------------------------------- model


def encoder() -> nn.Module:
    """LeNet-style shared encoder: 1x16x16 -> 50 features."""
    return nn.Sequential(
        nn.Conv2d(1, 10, 5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, 5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(20 * 4 * 4, 50),
        nn.ReLU(),
    )


def head() -> nn.Module:
    """A task's head: 50 features -> 10 digit logits."""
    return nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10))


def initial_weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts every method of a seed starts from: ``encoder`` and one head per task."""
    torch.manual_seed(seed)
    modules = {"encoder": encoder(), **{f"{t}_head": head() for t in TASKS}}
    return {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}


def build_model(weights: Mapping[str, Mapping[str, torch.Tensor]], tasks: Sequence[str]):  # type: ignore[no-untyped-def]
    """An mtlgraph model with ``tasks`` sharing one ``encoder``, from ``weights``."""
    enc = encoder()
    enc.load_state_dict(weights["encoder"])
    task_objs = []
    for t in tasks:
        h = head()
        h.load_state_dict(weights[f"{t}_head"])
        task_objs.append(
            Task(
                t,
                {"encoder": enc, f"{t}_head": h},
                [Operation("encoder", [("_input_", "image")]), Operation(f"{t}_head", ["encoder"])],
            )
        )
    return MultitaskClassifier(task_objs)


# ---------------------------------------------------------------- runs


class TimedStep(TrainStep):
    """The run's step, recording each call's duration (forward, balancer, optimizer step)."""

    seconds: ClassVar[list[float]] = []

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = super().__call__(*args, **kwargs)
        TimedStep.seconds.append(time.perf_counter() - start)
        return out


@dataclass
class RunResult:
    """One fit: test (and valid) accuracy per task and the step times."""

    accuracy: dict[str, float]  # task -> test accuracy
    valid_accuracy: dict[str, float]  # task -> valid accuracy
    step_seconds: list[float]  # each optimizer step
    epochs: int
    error: str | None = None

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.step_seconds) / self.epochs

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)


def run_ours(
    spec: str | dict[str, Any],
    data: Mapping[str, Split],
    config: Config,
    seed: int,
    tasks: Sequence[str] = TASKS,
) -> RunResult:
    """Train mtlgraph on ``tasks`` with balancer ``spec`` from seed ``seed``'s initial weights."""
    model = build_model(initial_weights(seed), tasks)
    dls = loaders(data, tasks, config, seed)
    trainer = Trainer(
        n_epochs=config.epochs,
        lr=config.lr,
        optimizer="adam",
        balancer=spec,
        seed=seed,
        progress_bar=False,
        evaluation_freq=1,  # valid each epoch: inverse_metric weights from it
        eval_splits=["valid"],
        writers=[],
    )
    TimedStep.seconds = []
    # the loop builds its step from this module attribute: swap in the timed one for this fit
    with mock.patch.object(trainer_module, "TrainStep", TimedStep):
        trainer.fit(model, dls)
    steps = list(TimedStep.seconds)
    scores = model.score([dl for dl in dls if dl.dataset.split != "train"])
    return RunResult(
        accuracy={t: scores[f"{t}/multidigits/test/accuracy"] for t in tasks},
        valid_accuracy={t: scores[f"{t}/multidigits/valid/accuracy"] for t in tasks},
        step_seconds=steps,
        epochs=config.epochs,
    )


def delta_m(
    scores: Mapping[str, float],
    single: Mapping[str, float],
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Δm% = 1/T Σ_t (−1)^{l_t} (M_t − M_single,t) / M_single,t · 100 (``l_t = 1`` when lower is
    better), over the tasks of ``single``.

    >>> round(delta_m({"a": 0.9, "b": 0.8}, {"a": 0.8, "b": 0.8}), 4)  # (12.5 + 0) / 2
    6.25
    >>> round(delta_m({"e": 0.5}, {"e": 0.4}, {"e": False}), 4)  # an error rate: higher is worse
    -25.0
    """
    terms = []
    for task, base in single.items():
        sign = 1.0 if (higher_is_better or {}).get(task, True) else -1.0
        terms.append(sign * (scores[task] - base) / base * 100)
    return sum(terms) / len(terms)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[RunResult], single: Mapping[str, float]) -> dict[str, Any]:
    """Table row of one method over its seeds (``single``: mean single-task test accuracy)."""
    ok = [r for r in runs if r.error is None]
    if not ok:
        return {"error": next(r.error for r in runs)}
    row: dict[str, Any] = {"seeds": len(ok)}
    for t in ok[0].accuracy:
        row[f"{t}_mean"], row[f"{t}_std"] = mean_std([r.accuracy[t] for r in ok])
    deltas = [delta_m(r.accuracy, single) for r in ok] if set(single) <= set(ok[0].accuracy) else []
    if deltas:
        row["delta_m_mean"], row["delta_m_std"] = mean_std(deltas)
    steps = [s for r in ok for s in r.step_seconds]
    row["ms_per_step"] = 1e3 * statistics.median(steps)
    row["ms_per_step_p10"] = 1e3 * float(np.quantile(steps, 0.1))
    row["s_per_epoch"] = statistics.median([r.seconds_per_epoch for r in ok])
    return row


def guarded(epochs: int, fn: Callable[..., RunResult], *args: Any, **kwargs: Any) -> RunResult:
    """``fn(*args, **kwargs)``, or an empty result carrying the error (one broken method must not
    end the run): ``skipped: ...`` for a missing package, ``failed: ...`` for anything else."""
    try:
        return fn(*args, **kwargs)
    except ImportError as e:
        return RunResult({}, {}, [], epochs, error=f"skipped: {e}")
    except Exception as e:
        return RunResult({}, {}, [], epochs, error=f"failed: {type(e).__name__}: {e}")


def method_specs(modes: Sequence[str] = EXTRA_MODES) -> dict[str, str | dict[str, Any]]:
    """Row name -> balancer spec: every registered balancer by name, then, for each of ``modes``,
    ``"<name> [<mode>]"`` for each balancer that accepts ``gradients: <mode>``.

    >>> specs = method_specs(["representation"])
    >>> specs["mgda [representation]"], "sum [representation]" in specs
    ({'name': 'mgda', 'gradients': 'representation'}, False)
    """
    specs: dict[str, str | dict[str, Any]] = {name: name for name in BALANCERS.names()}
    for mode in modes:
        for name in BALANCERS.names():
            spec = {"name": name, "gradients": mode}
            try:
                BALANCERS.build(spec)
            except ConfigError:  # takes no `gradients`, or refuses this mode
                continue
            specs[f"{name} [{mode}]"] = spec
    return specs


def run_all(
    config: Config,
    seeds: Sequence[int],
    log: Callable[[str], None],
    with_peers: bool = False,
    timing_rounds: int = 7,
    modes: Sequence[str] = EXTRA_MODES,
) -> dict[str, Any]:
    """Single-task baselines and every registered balancer over ``seeds``; the result table.

    ``modes``: the extra gradient modes (:func:`method_specs`). ``with_peers``: right after each
    of our runs of a method the peers implement, the peers' runs of it (same seed), so machine
    noise hits the three alike; ``result["peers"]``.
    """
    data = make_multidigits(config)
    single_runs: dict[str, list[RunResult]] = {t: [] for t in TASKS}
    specs = method_specs(modes)
    method_runs: dict[str, list[RunResult]] = {name: [] for name in specs}
    peer_runs = None
    if with_peers:
        from bench import peers

        peer_runs = peers.empty_runs()
    for seed in seeds:
        for t in TASKS:
            single_runs[t].append(run_ours("sum", data, config, seed, tasks=[t]))
            log(f"seed {seed} single-task {t}: {single_runs[t][-1].accuracy[t]:.4f}")
        for name in method_runs:
            r = guarded(config.epochs, run_ours, specs[name], data, config, seed)
            method_runs[name].append(r)
            log(f"seed {seed} {name}: {r.error or r.accuracy}")
            if peer_runs is not None:  # the peers' runs of this method, right after ours
                same = [m for m in peers.METHODS if m.ours == name]
                peers.run_seed(data, config, seed, peer_runs, log, same, ours=r)
        if peer_runs is not None:  # methods whose settings differ from our defaults
            other = [m for m in peers.METHODS if not peers.shares_our_default(m)]
            peers.run_seed(data, config, seed, peer_runs, log, other)
    single = {t: statistics.fmean(r.accuracy[t] for r in single_runs[t]) for t in TASKS}
    rows = {"single_task": single_row(single_runs)}
    rows.update({name: summarize(runs, single) for name, runs in method_runs.items()})
    result = {
        "benchmark": "multidigits",
        "config": {
            **asdict(config),
            "pairs": dict(config.pairs),
            "seeds": list(seeds),
            "modes": list(modes),
        },
        "tasks": list(TASKS),
        "single_task_accuracy": single,
        "methods": rows,
        "per_seed": {
            name: [{"accuracy": r.accuracy, "error": r.error} for r in runs]
            for name, runs in method_runs.items()
        },
        "threads": torch.get_num_threads(),
    }
    if peer_runs is not None:
        result["peers"] = peers.peer_rows(peer_runs, seeds)
        times = peers.time_steps(data, config, log, rounds=timing_rounds)
        peers.add_timing(result["peers"], times)
    return result


def single_row(single_runs: Mapping[str, Sequence[RunResult]]) -> dict[str, Any]:
    """The single-task row: each task from its own model (Δm is 0 by definition)."""
    row: dict[str, Any] = {"seeds": len(next(iter(single_runs.values())))}
    for t, runs in single_runs.items():
        row[f"{t}_mean"], row[f"{t}_std"] = mean_std([r.accuracy[t] for r in runs])
    row["delta_m_mean"], row["delta_m_std"] = 0.0, 0.0
    steps = [s for runs in single_runs.values() for r in runs for s in r.step_seconds]
    row["ms_per_step"] = 1e3 * statistics.median(steps)  # one task's model
    row["s_per_epoch"] = sum(  # both tasks' models: the cost of the single-task solution
        statistics.median([r.seconds_per_epoch for r in runs]) for runs in single_runs.values()
    )
    return row


def format_table(result: Mapping[str, Any]) -> str:
    """The result as a Markdown table."""
    tasks = result["tasks"]
    head_cells = ["method", *[f"{t} acc %" for t in tasks], "Δm % ", "ms/step", "s/epoch"]
    lines = ["| " + " | ".join(head_cells) + " |", "|" + "---|" * len(head_cells)]
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | " + " | ".join(["—"] * (len(head_cells) - 2)) + " |")
            lines[-1] = lines[-1][:-1] + f"| {row['error'][:80]} |"
            continue
        cells = [name]
        cells += [f"{100 * row[f'{t}_mean']:.2f} ± {100 * row[f'{t}_std']:.2f}" for t in tasks]
        dm = row.get("delta_m_mean")
        cells.append("—" if dm is None else f"{dm:+.2f} ± {row['delta_m_std']:.2f}")
        cells += [f"{row['ms_per_step']:.2f}", f"{row['s_per_epoch']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Write ``result`` as indented JSON (NaN/inf become null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(result), indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="MultiDigits multi-task benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes (~1-3 minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument(
        "--modes",
        nargs="*",
        choices=EXTRA_MODES,
        default=None,
        help="extra gradient modes, one row each per accepting balancer (default: both; none "
        "with --quick)",
    )
    parser.add_argument("--peers", action="store_true", help="also LibMTL and TorchJD")
    parser.add_argument("--json", default=None, help="write the result here (JSON)")
    parser.add_argument("--timing-rounds", type=int, default=7, help="peers: timing rotations")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else Config()
    if args.epochs:
        config = Config(**{**asdict(config), "pairs": dict(config.pairs), "epochs": args.epochs})

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    modes = args.modes if args.modes is not None else ([] if args.quick else EXTRA_MODES)
    result = run_all(config, args.seeds, log, args.peers, args.timing_rounds, modes)
    print(format_table(result))
    if args.peers:
        from bench import peers

        print()
        print(peers.format_peer_table(result["peers"]))
    result["wall_seconds"] = time.perf_counter() - start
    print(
        f"\n{len(args.seeds)} seeds, {config.epochs} epochs, modes: "
        f"{' '.join(['parameters', *modes])}, {result['wall_seconds']:.0f} s"
    )
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
