"""Inference speed: ``model.predict`` vs a hand-written ``torch.no_grad()`` loop, and the exported
programs (onnxruntime, the loaded ``.pt2``) vs eager PyTorch, on the same batches, in one run.

Part 1, ``predict`` throughput (rows/s) on an in-memory table: the seed tutorial's model (three
tasks on a shared ``base_mlp`` trunk, each reading its own field) and a wide MLP (two tasks on a
2048-wide trunk), at ``mtlgraph predict``'s default batch of 256 rows; the tutorial model also at
batch 32, where per-batch Python work weighs most (for information). The reference loop runs
the same modules on the same batches, applies the same softmax, keeps the probabilities and
takes the argmax at the end: what you would write by hand. Target (DESIGN.md): predict >= 0.95x
the loop's rows/s. The streaming file writer (``write_predictions`` to JSON Lines) is timed
too, for information.

Part 2, the exported programs: every task of both models exported once with ``model.export``,
then the same batches run through onnxruntime, through ``torch.export.load(...).module()`` and
through eager PyTorch (``torch.no_grad``, the same modules). Ratios are printed; no target.

Run: ``python bench/inference.py [--repeats 9] [--quick] [--threads 1] [--skip-export]``.
Medians of alternating repeats; one thread by default (the usual serving setting, and the least
noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
from mtlgraph.inference.export import TaskGraph
from mtlgraph.inference.predictions import write_predictions


def make_model(names: list[str], in_dim: int, width: list[int]) -> MultitaskClassifier:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = in_dim
    for w in width:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    trunk = nn.Sequential(*layers)
    tasks = [
        Task(
            f"{n}_task",
            {"base_mlp": trunk, f"{n}_head": nn.Linear(d, 2)},
            [
                Operation("base_mlp", [("_input_", f"{n}_data")]),
                Operation(f"{n}_head", ["base_mlp"]),
            ],
        )
        for n in names
    ]
    model = MultitaskClassifier(tasks)
    model.eval()
    return model


def make_batches(
    names: list[str], in_dim: int, rows: int, batch_size: int
) -> list[tuple[dict, dict]]:
    g = torch.Generator().manual_seed(0)
    X = {f"{n}_data": torch.randn(rows, in_dim, generator=g) for n in names}
    loader = DictDataLoader(DictDataset("table", "serve", X, {}), batch_size=batch_size)
    return list(loader)  # the same batches for every contender


def raw_loop(model: MultitaskClassifier, names: list[str], batches: list) -> dict:
    """The hand-written loop: the same modules, softmax, probabilities kept, argmax at the end."""
    trunk = model.module_pool["base_mlp"]
    heads = [model.module_pool[f"{n}_head"] for n in names]
    fields = [f"{n}_data" for n in names]
    probs: list[list[torch.Tensor]] = [[] for _ in names]
    with torch.no_grad():
        for X, _ in batches:
            for i, (f, head) in enumerate(zip(fields, heads, strict=True)):
                probs[i].append(torch.softmax(head(trunk(X[f])), dim=1))
    out = {}
    for n, p in zip(names, probs, strict=True):
        cat = torch.cat(p)
        out[n] = (cat.numpy(), cat.argmax(dim=1).numpy())
    return out


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, with the garbage collector off (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def compare(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each contender, run in alternation ``repeats`` times (after a
    warm-up), in a new random order each time, so that the machine's drifts hit every
    contender alike."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
    order = list(contenders)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            times[k].append(timed(contenders[k]))
    return times


def ratio(times: dict[str, list[float]], reference: str, other: str) -> float:
    """Median over repeats of ``reference time / other time`` (adjacent runs paired: robust to
    the load of a shared machine). Above 1: ``other`` is faster."""
    return statistics.median(r / o for r, o in zip(times[reference], times[other], strict=True))


def bench_predict(label: str, names: list[str], in_dim: int, width: list[int], rows: int,
                  batch_size: int, repeats: int, tmp: Path,
                  target: bool = True) -> MultitaskClassifier:  # fmt: skip
    """Part 1 for one model; returns the model."""
    model = make_model(names, in_dim, width)
    batches = make_batches(names, in_dim, rows, batch_size)
    tasks = [f"{n}_task" for n in names]
    # same numbers first
    ours = model.predict(batches, task_names=tasks, return_preds=True)
    ref = raw_loop(model, names, batches)
    for n, t in zip(names, tasks, strict=True):
        assert np.array_equal(ours["probs"][t], ref[n][0]), t
        assert np.array_equal(ours["preds"][t], ref[n][1]), t
    times = compare(
        {
            "raw": lambda: raw_loop(model, names, batches),
            "predict": lambda: model.predict(batches, task_names=tasks, return_preds=True),
            "write_jsonl": lambda: write_predictions(model, batches, tmp / "p.jsonl", tasks),
        },
        repeats,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{label}: {rows} rows, batch {batch_size}, {len(tasks)} tasks, {repeats} repeats")
    print(f"  hand-written no_grad loop  {rows / med['raw']:>12,.0f} rows/s (median)")
    print(f"  model.predict              {rows / med['predict']:>12,.0f} rows/s")
    print(f"  write_predictions (.jsonl) {rows / med['write_jsonl']:>12,.0f} rows/s")
    r = ratio(times, "raw", "predict")
    verdict = "ok" if r >= 0.95 else "BELOW TARGET"
    print(f"  predict / raw throughput: {r:.3f}x (median of adjacent paired runs)")
    print(f"  (target >= 0.95x: {verdict})" if target else "  (for information, no target)")
    return model


def bench_exported(label: str, model: MultitaskClassifier, names: list[str], in_dim: int,
                   rows: int, batch_size: int, repeats: int, tmp: Path) -> None:  # fmt: skip
    import onnxruntime

    batches = make_batches(names, in_dim, rows, batch_size)
    tasks = [f"{n}_task" for n in names]
    example = batches[0][0]
    onnx_path = model.export(tmp / "m.onnx", tasks, "onnx", example)
    pt2_path = model.export(tmp / "m.pt2", tasks, "torch_export", example)
    fields = [f"{n}_data" for n in names]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )
    program = torch.export.load(pt2_path).module()
    graph = TaskGraph(model, tasks, fields)
    numpy_batches = [{f: X[f].numpy() for f in fields} for X, _ in batches]

    def eager() -> None:
        with torch.no_grad():
            for X, _ in batches:
                graph(*(X[f] for f in fields))

    def pt2() -> None:
        with torch.no_grad():
            for X, _ in batches:
                program(*(X[f] for f in fields))

    def ort() -> None:
        for feed in numpy_batches:
            session.run(None, feed)

    times = compare({"eager": eager, "pt2": pt2, "onnxruntime": ort}, repeats)
    print(f"\n{label}, exported ({rows} rows, batch {batch_size}):")
    for k in ("eager", "pt2", "onnxruntime"):
        rate = rows / statistics.median(times[k])
        print(f"  {k:<12} {rate:>12,.0f} rows/s  ({ratio(times, 'eager', k):.2f}x eager's speed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="smaller tables, 5 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--skip-export", action="store_true", help="part 1 only")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    scale = 4 if args.quick else 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tutorial = ["circle", "square", "inv_circle"]
        # batch 256: mtlgraph predict's default; batch 32: the training benchmark's, where
        # per-batch Python work weighs most (for information)
        model = bench_predict("tutorial model", tutorial, 2, [8, 4], 32_000 // scale, 256,
                              repeats, tmp)  # fmt: skip
        bench_predict("tutorial model", tutorial, 2, [8, 4], 4_000 // scale, 32, repeats, tmp,
                      target=False)  # fmt: skip
        wide = ["a", "b"]
        wide_model = bench_predict("wide MLP", wide, 512, [2048, 2048], 1_024 // scale, 256,
                                   repeats, tmp)  # fmt: skip
        if args.skip_export:
            return
        bench_exported("tutorial model", model, tutorial, 2, 32_000 // scale, 256, repeats, tmp)
        bench_exported("wide MLP", wide_model, wide, 512, 1_024 // scale, 256, repeats, tmp)


if __name__ == "__main__":
    main()
