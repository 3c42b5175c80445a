"""MultiDigits side by side with LibMTL 1.1.5 and TorchJD, in one process.

For every method that mtlgraph and a peer both implement, the same data, model, initial
weights, batch order (the same ``DictDataLoader`` epochs), optimizer (Adam, same learning rate)
and seeds; the three implementations of a method run one after the other for each seed, so
machine noise hits them alike. Reported per method: the mean test accuracy over the two tasks
(mean ± std over seeds) and the median seconds per optimizer step (forward, the method, the
optimizer step; no data loading, no evaluation) as the ratio ours / theirs (≤ 1: we are not
slower). The step times come from a separate phase (:func:`time_steps`) that rotates through
the libraries in short segments, so other jobs on a shared machine hit each alike.

Peers: LibMTL's weighting classes through :mod:`bench._libmtl_shim` (its trainer's loop, written
out below), TorchJD's aggregators through ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` on the
encoder's parameters. A peer that is not installed (or an aggregator whose optional solver is
missing) is skipped with the reason in the table.

Run: ``python -m bench.multidigits --peers`` (or ``python -m bench.peers [--quick]``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` and the worktree importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _libmtl_shim
from bench.multidigits import (
    QUICK,
    TASKS,
    Config,
    RunResult,
    Split,
    encoder,
    guarded,
    head,
    initial_weights,
    loaders,
    make_multidigits,
    mean_std,
    run_ours,
)
from mtlgraph.balancing import BALANCERS


def _torchjd(name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        from torchjd import aggregation

        return getattr(aggregation, name)(**kwargs)

    return make


@dataclass(frozen=True)
class Method:
    """One method in the three libraries (``None``: that library does not implement it)."""

    label: str
    ours: str | dict[str, Any]  # balancer spec (matching the peers' settings)
    libmtl: tuple[str, dict[str, Any]] | None = None  # weighting class, its backward kwargs
    torchjd: Callable[[], Any] | None = None  # builds the aggregator
    note: str = ""  # known differences between the implementations
    extra: dict[str, Any] = field(default_factory=dict)


METHODS = [
    Method("EW", "sum", ("EW", {}), _torchjd("Sum"), "equal weights 1 (TorchJD: Sum)"),
    Method(
        "UW",
        "uncertainty",
        ("UW", {}),
        None,
        "ours exp(-s)L+s/2 from s=0; LibMTL L/(2e^s)+s/2 from s=-0.5",
    ),
    Method("DWA", "dwa", ("DWA", {"T": 2.0}), None, "T = 2"),
    Method(
        "GradNorm",
        "gradnorm",
        ("GradNorm", {"alpha": 1.5}),
        None,
        "alpha 1.5; LibMTL: EW for epoch 0, then L(0) = epoch 0's mean loss",
    ),
    Method("RLW", "rlw", ("RLW", {"dist": "Normal"}), _torchjd("Random"), "ours K·softmax(z)"),
    Method(
        "MGDA",
        {"name": "mgda", "rescale": False},
        ("MGDA", {"mgda_gn": "none"}),
        _torchjd("MGDA"),
        "no gradient normalisation, no rescaling",
    ),
    Method("PCGrad", "pcgrad", ("PCGrad", {}), _torchjd("PCGrad")),
    Method(
        "CAGrad",
        "cagrad",
        ("CAGrad", {"calpha": 0.4, "rescale": 1}),
        _torchjd("CAGrad", c=0.4),
        "c = 0.4 (our default), divided by 1 + c²",
    ),
    Method(
        "GradVac",
        {"name": "gradvac", "beta": 0.5},
        ("GradVac", {"beta": 0.5}),
        _torchjd("GradVac", beta=0.5),
        "EMA beta = 0.5 (the peers' default; ours is the paper's 0.01)",
    ),
    Method("IMTL-G", "imtl", None, _torchjd("IMTLG"), "gradient part only"),
    Method(
        "IMTL",
        {"name": "imtl", "loss_scaling": True},
        ("IMTL", {}),
        None,
        "hybrid: IMTL-G + learned loss scales (IMTL-L)",
    ),
    Method("UPGrad", "upgrad", None, _torchjd("UPGrad")),
    Method("Aligned-MTL", "aligned_mtl", None, _torchjd("AlignedMTL")),
    Method("Nash-MTL", "nash_mtl", None, _torchjd("NashMTL", n_tasks=len(TASKS))),
]


def _modules(seed: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    weights = initial_weights(seed)
    enc = encoder()
    enc.load_state_dict(weights["encoder"])
    heads = {}
    for t in TASKS:
        heads[t] = head()
        heads[t].load_state_dict(weights[f"{t}_head"])
    return enc, heads


def _seed_all(seed: int) -> None:
    """Global random state as the mtlgraph Trainer leaves it inside fit (peers draw from it)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def _accuracy(enc: nn.Module, heads: Mapping[str, nn.Module], split: Split) -> dict[str, float]:
    enc.eval()
    rep = enc(split.images)
    out = {t: float((h(rep).argmax(1) == split.labels[t]).float().mean()) for t, h in heads.items()}
    enc.train()
    return out


def _result(
    enc: nn.Module,
    heads: Mapping[str, nn.Module],
    data: Mapping[str, Split],
    steps: list[float],
    config: Config,
) -> RunResult:
    for h in heads.values():
        h.eval()
    return RunResult(
        accuracy=_accuracy(enc, heads, data["test"]),
        valid_accuracy=_accuracy(enc, heads, data["valid"]),
        step_seconds=steps,
        epochs=config.epochs,
    )


def run_libmtl(
    name: str, kwargs: Mapping[str, Any], data: Mapping[str, Split], config: Config, seed: int
) -> RunResult:
    """LibMTL's ``Trainer.train`` loop (one input, ``rep_grad=False``) with weighting ``name``."""
    cls = _libmtl_shim.weighting_class(name)
    enc, heads = _modules(seed)
    model = _libmtl_shim.host(cls, enc, heads, config.epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)  # loss_scale included
    train = next(dl for dl in loaders(data, TASKS, config, seed) if dl.dataset.split == "train")
    _seed_all(seed)
    steps: list[float] = []
    for epoch in range(config.epochs):
        model.epoch = epoch
        model.train()
        train.set_epoch(epoch)
        total, n = np.zeros(len(TASKS)), 0
        for X, Y in train:
            start = time.perf_counter()
            out = model(X["image"])
            losses = torch.stack([F.cross_entropy(out[t], Y[t]) for t in TASKS])
            optimizer.zero_grad()
            model.backward(losses, **kwargs)
            optimizer.step()
            steps.append(time.perf_counter() - start)
            total += losses.detach().numpy()
            n += 1
        model.train_loss_buffer[:, epoch] = total / n
    return _result(enc, heads, data, steps, config)


def run_torchjd(
    make: Callable[[], Any], data: Mapping[str, Split], config: Config, seed: int
) -> RunResult:
    """TorchJD's multi-task loop: ``mtl_backward`` on the losses, ``jac_to_grad`` on the encoder."""
    from torchjd.autojac import jac_to_grad, mtl_backward

    aggregator = make()
    enc, heads = _modules(seed)
    params = [*enc.parameters(), *(p for h in heads.values() for p in h.parameters())]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    train = next(dl for dl in loaders(data, TASKS, config, seed) if dl.dataset.split == "train")
    _seed_all(seed)
    steps: list[float] = []
    for epoch in range(config.epochs):
        train.set_epoch(epoch)
        for X, Y in train:
            start = time.perf_counter()
            features = enc(X["image"])
            losses = [F.cross_entropy(heads[t](features), Y[t]) for t in TASKS]
            optimizer.zero_grad()
            mtl_backward(losses, features=features)
            jac_to_grad(enc.parameters(), aggregator)
            optimizer.step()
            steps.append(time.perf_counter() - start)
    return _result(enc, heads, data, steps, config)


def _side(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Accuracy (mean over tasks, then mean ± std over seeds) and median step of one library."""
    ok = [r for r in runs if r.error is None]
    if not ok or len(ok) < len(runs):
        return {"error": next(r.error for r in runs if r.error is not None)}
    acc = [statistics.fmean(r.accuracy.values()) for r in ok]
    steps = [s for r in ok for s in r.step_seconds]
    mean, std = mean_std(acc)
    return {
        "accuracy_mean": mean,
        "accuracy_std": std,
        "per_task": {t: mean_std([r.accuracy[t] for r in ok])[0] for t in TASKS},
        "ms_per_step": 1e3 * statistics.median(steps),
        "ms_per_step_p10": 1e3 * float(np.quantile(steps, 0.1)),
    }


LIBS = ("mtlgraph", "LibMTL", "TorchJD")
Runs = dict[str, dict[str, list[RunResult]]]  # method label -> library -> one run per seed


def empty_runs() -> Runs:
    return {m.label: {lib: [] for lib in LIBS} for m in METHODS}


def shares_our_default(m: Method) -> bool:
    """Whether our side of ``m`` is a registered balancer with its default settings."""
    return isinstance(m.ours, str) and m.ours in BALANCERS


def run_seed(
    data: Mapping[str, Split],
    config: Config,
    seed: int,
    runs: Runs,
    log: Callable[[str], None],
    methods: Sequence[Method],
    ours: RunResult | None = None,
) -> None:
    """One seed of ``methods``, each in the three libraries, into ``runs``.

    ``ours``: our run of these methods, already made (by the caller, with the balancer's
    default settings), else ours runs here first.
    """
    epochs = config.epochs
    for m in methods:
        sides = runs[m.label]
        name = m.ours if isinstance(m.ours, str) else m.ours["name"]
        if ours is not None:
            sides["mtlgraph"].append(ours)
        elif name in BALANCERS:
            sides["mtlgraph"].append(guarded(epochs, run_ours, m.ours, data, config, seed))
        if m.libmtl is not None:
            lib, kwargs = m.libmtl
            sides["LibMTL"].append(guarded(epochs, run_libmtl, lib, kwargs, data, config, seed))
        if m.torchjd is not None:
            sides["TorchJD"].append(guarded(epochs, run_torchjd, m.torchjd, data, config, seed))
        log(
            f"seed {seed} {m.label}: "
            + ", ".join(
                f"{lib} {r[-1].error or round(statistics.fmean(r[-1].accuracy.values()), 4)}"
                for lib, r in sides.items()
                if r
            )
        )


def peer_rows(runs: Runs, seeds: Sequence[int]) -> dict[str, Any]:
    """One row per method: each library's accuracy and step time, ours over theirs."""
    rows: dict[str, Any] = {}
    for m in METHODS:
        row: dict[str, Any] = {"ours_spec": m.ours, "note": m.note}
        for lib, lib_runs in runs[m.label].items():
            if lib_runs:
                row[lib] = _side(lib_runs)
            elif lib == "mtlgraph":
                row[lib] = {"error": "not in mtlgraph's BALANCERS"}
        ours = row["mtlgraph"]
        for lib in ("LibMTL", "TorchJD"):
            theirs = row.get(lib)
            if theirs is None or "error" in theirs or "error" in ours:
                continue
            diff = ours["accuracy_mean"] - theirs["accuracy_mean"]
            theirs["accuracy_diff"] = diff
            spread = ours["accuracy_std"] + theirs["accuracy_std"]
            theirs["within_spread"] = abs(diff) <= spread or abs(diff) < 1e-9
            # step times of the accuracy runs; add_timing replaces them with the rotation's
            theirs["time_ratio"] = ours["ms_per_step"] / theirs["ms_per_step"]
            theirs["time_ratio_p10"] = ours["ms_per_step_p10"] / theirs["ms_per_step_p10"]
        rows[m.label] = row
    return {"seeds": list(seeds), "methods": rows}


def _head(split: Split, n: int) -> Split:
    return Split(
        split.images[:n],
        {t: y[:n] for t, y in split.labels.items()},
        {t: i[:n] for t, i in split.sources.items()},
    )


def time_steps(
    data: Mapping[str, Split],
    config: Config,
    log: Callable[[str], None],
    rounds: int = 7,
    steps: int = 10,
) -> dict[str, dict[str, list[float]]]:
    """Step times of each method in each library, measured in rotation.

    The accuracy runs take seconds each, and other jobs on a shared machine come and go on
    that scale, so their step times compare badly across libraries. Here every (method,
    library) trains ``steps`` batches x 3 epochs from seed 0, one after the other, ``rounds``
    times over; only the third epoch's steps count (LibMTL's GradNorm and DWA and our DWA do
    plain sums before that), so noise hits all alike. Returns label -> library -> seconds.
    """
    n = steps * config.batch_size
    small = {"train": _head(data["train"], n), "valid": _head(data["valid"], 64)}
    small["test"] = _head(data["test"], 64)
    cfg = Config(
        pairs={k: len(v.images) for k, v in small.items()},
        epochs=3,
        batch_size=config.batch_size,
        lr=config.lr,
        data_seed=config.data_seed,
    )
    out: dict[str, dict[str, list[float]]] = {m.label: {} for m in METHODS}
    for r in range(rounds):
        for m in METHODS:
            name = m.ours if isinstance(m.ours, str) else m.ours["name"]
            fits = {}
            if name in BALANCERS:
                fits["mtlgraph"] = lambda m=m: run_ours(m.ours, small, cfg, 0)
            if m.libmtl is not None:
                fits["LibMTL"] = lambda m=m: run_libmtl(*m.libmtl, small, cfg, 0)  # type: ignore[misc]
            if m.torchjd is not None:
                fits["TorchJD"] = lambda m=m: run_torchjd(m.torchjd, small, cfg, 0)  # type: ignore[arg-type]
            for lib, fit in fits.items():
                result = guarded(cfg.epochs, fit)
                if result.error is None:
                    out[m.label].setdefault(lib, []).extend(result.step_seconds[-steps:])
        log(f"timing round {r + 1}/{rounds} done")
    return out


def add_timing(peers: dict[str, Any], times: Mapping[str, Mapping[str, list[float]]]) -> None:
    """Put the rotation's step times and ratios (ours / theirs) into the peer rows."""
    for label, by_lib in times.items():
        row = peers["methods"][label]
        ours = by_lib.get("mtlgraph")
        for lib, seconds in by_lib.items():
            side = row.get(lib)
            if side is None or "error" in side:
                continue
            side["rotation_ms_per_step"] = 1e3 * statistics.median(seconds)
            side["rotation_ms_per_step_p10"] = 1e3 * float(np.quantile(seconds, 0.1))
            if lib != "mtlgraph" and ours:
                side["time_ratio"] = statistics.median(ours) / statistics.median(seconds)
                side["time_ratio_p10"] = float(np.quantile(ours, 0.1) / np.quantile(seconds, 0.1))


def run_peers(
    config: Config,
    seeds: Sequence[int],
    log: Callable[[str], None] = print,
    timing_rounds: int = 7,
) -> dict[str, Any]:
    """Every method of :data:`METHODS` in mtlgraph, LibMTL and TorchJD; one row per method."""
    data = make_multidigits(config)
    runs = empty_runs()
    for seed in seeds:
        run_seed(data, config, seed, runs, log, METHODS)
    result = peer_rows(runs, seeds)
    add_timing(result, time_steps(data, config, log, rounds=timing_rounds))
    return result


def _cell(side: Mapping[str, Any] | None) -> str:
    if side is None:
        return "—"
    if "error" in side:
        return side["error"][:70]
    return f"{100 * side['accuracy_mean']:.2f} ± {100 * side['accuracy_std']:.2f}"


def format_peer_table(peers: Mapping[str, Any]) -> str:
    """Markdown table: accuracy of each library, and our step time over each peer's.

    Time cells: ratio of median step times (in brackets: of the 10th percentiles, less
    sensitive to other jobs on the machine); ``‡``: the accuracy difference exceeds the sum of
    the two seed standard deviations.
    """
    cols = [
        "method",
        "mtlgraph acc %",
        "LibMTL acc %",
        "TorchJD acc %",
        "ms/step ours",
        "time ours/LibMTL",
        "time ours/TorchJD",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, row in peers["methods"].items():
        ours = row["mtlgraph"]
        cells = [label, _cell(ours), _cell(row.get("LibMTL")), _cell(row.get("TorchJD"))]
        ms = ours.get("rotation_ms_per_step", ours.get("ms_per_step"))
        cells.append("—" if ms is None else f"{ms:.2f}")
        for lib in ("LibMTL", "TorchJD"):
            side = row.get(lib) or {}
            if "time_ratio" in side:
                flag = "" if side["within_spread"] else " ‡"
                cells.append(f"{side['time_ratio']:.2f} × ({side['time_ratio_p10']:.2f}){flag}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="MultiDigits: mtlgraph vs LibMTL and TorchJD")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--timing-rounds", type=int, default=7, help="rotations of the timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else Config()
    result = run_peers(
        config,
        args.seeds,
        lambda s: print(s, file=sys.stderr, flush=True),
        timing_rounds=args.timing_rounds,
    )
    print(format_peer_table(result))
    if args.json:
        from bench.multidigits import write_json

        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
