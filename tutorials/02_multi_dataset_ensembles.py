"""Many task-specific datasets, image + text, and destructive interference: the Tonks story.

ShopRunner's Tonks (now Octopod) trains one multi-task model on many datasets, each labelled for
one attribute, with an image model and a text model ensembled per task. When they added a fifth
attribute, another attribute's score fell below its single-task baseline: *destructive
interference*. Their fix was a second image network for the tasks that fight.

Here the products are scikit-learn's bundled 8×8 handwritten digits, seen as photos of product
tags, each with a generated description ("handwritten tag seven angular ink"). Three datasets,
each labelled for one task only:

- ``catalog``: ``digit_task``, which digit the tag shows (10 classes);
- ``shapes``: ``loop_task``, whether the digit has a closed loop (0, 6, 8, 9), a related task;
- ``prices``: ``price_task``, the price in dollars (regression). It is readable from the photo
  (a pattern of the pixels that has nothing to do with the digit) and its loss, in squared
  dollars, is far larger than the others'.

Every task fuses (concatenates) the features of an image trunk and of a text trunk and has its
own head. Tasks that name the same trunk share it. The steps:

1. ``digit_task`` alone: its single-task baseline.
2. ``digit_task`` + ``loop_task`` on one image trunk: related tasks; the digit score stays close.
3. ``price_task`` joins the shared image trunk: ``digit_task`` falls far below its baseline. The
   interference diagnostics (``Trainer(diagnostics=...)``, docs/diagnostics.md) show why: on the
   image trunk the price gradients are over 100× larger than the digit gradients and, on
   average, point against them; a lookahead gradient step on the price loss raises the digit
   loss (negative task affinity); and the suggested grouping puts ``price_task`` in a trunk of its
   own.
4. Following the suggestion, ``price_task`` names a second module, ``price_image_trunk``: the
   digit score recovers to its baseline.

(``price_task`` itself stays poorly fit here: its target is in raw dollars. Standardising it or
balancing the losses, tutorial 04, would help it; the point is that it no longer drags the others
down.)

Run: ``python tutorials/02_multi_dataset_ensembles.py`` (about 10 s)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.data.synthetic import DIGIT_WORDS, make_digit_products
from mtlgraph.diagnostics import DiagnosticsReport
from mtlgraph.graph.modules import Concat, EmbeddingBag

# task -> (dataset, attribute of the generated products, number of classes; None = regression)
TASKS: dict[str, tuple[str, str, int | None]] = {
    "digit_task": ("catalog", "digit", 10),
    "loop_task": ("shapes", "loop", 2),
    "price_task": ("prices", "price", None),
}
PRICES = {"price_mean": 50.0, "price_scale": 10.0}  # dollars: $50 on average, ±$10 by photo
PROBE_ROWS = 128  # rows of each training dataset in an interference probe
WIDTH = 16  # image trunk features
TEXT_WIDTH = 8  # text trunk features


def make_loaders(
    n_items: int | None, seed: int, batch_size: int = 32
) -> dict[str, list[DictDataLoader]]:
    """Task -> its dataset's train/valid/test loaders; the datasets hold disjoint products."""
    loaders: dict[str, list[DictDataLoader]] = {}
    for part, (task_name, (dataset, attribute, _)) in enumerate(TASKS.items()):
        data = make_digit_products(
            n=n_items, part=part, parts=len(TASKS), seed=seed, fractions=(0.6, 0.1, 0.3), **PRICES
        )
        loaders[task_name] = [
            DictDataLoader(
                DictDataset(
                    dataset,
                    split,
                    {"image": torch.from_numpy(a["image"]), "text": torch.from_numpy(a["text"])},
                    {task_name: torch.from_numpy(a[attribute])},  # labelled for one task only
                ),
                batch_size=batch_size,
                shuffle=split == "train",
                seed=seed + part,
            )
            for split, a in data.items()
        ]
    return loaders


def build_model(
    task_names: list[str], image_trunks: dict[str, str] | None = None, seed: int = 0
) -> MultitaskClassifier:
    """Tasks fusing an image trunk and the shared text trunk, each with its own head.

    Args:
        task_names: The tasks.
        image_trunks: Task -> name of its image trunk (default ``"image_trunk"``). Tasks that
            name the same trunk share its weights; a new name is a new trunk.
        seed: Seed of the initial weights.
    """
    torch.manual_seed(seed)
    modules: dict[str, nn.Module] = {"text_trunk": EmbeddingBag(len(DIGIT_WORDS), TEXT_WIDTH)}
    tasks = []
    for task_name in task_names:
        trunk = (image_trunks or {}).get(task_name, "image_trunk")
        fusion = f"{trunk}_fusion"  # one fusion per trunk group: [image features, text features]
        if trunk not in modules:
            modules[trunk] = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU())
            modules[fusion] = Concat()
        classes = TASKS[task_name][2]
        head = f"{task_name.removesuffix('_task')}_head"
        tasks.append(
            Task(
                task_name,
                {
                    trunk: modules[trunk],
                    "text_trunk": modules["text_trunk"],
                    fusion: modules[fusion],
                    head: nn.Linear(WIDTH + TEXT_WIDTH, classes or 1),
                },
                [
                    Operation(trunk, [("_input_", "image")]),
                    Operation("text_trunk", [("_input_", "text")]),
                    Operation(fusion, [trunk, "text_trunk"]),
                    Operation(head, [fusion]),
                ],
                task_type="regression" if classes is None else "multiclass",
            )
        )
    return MultitaskClassifier(tasks)


def train(
    loaders: dict[str, list[DictDataLoader]],
    task_names: list[str],
    image_trunks: dict[str, str] | None = None,
    n_epochs: int = 10,
    every: int = 5,
    seed: int = 0,
) -> tuple[dict[str, float], DiagnosticsReport | None]:
    """Train a model of ``task_names``; return its test scores and its diagnostics report."""
    model = build_model(task_names, image_trunks, seed)
    data = [dl for t in task_names for dl in loaders[t]]
    # lr: the lookahead takes a plain gradient step of 0.01 (the pull of each task's gradient);
    # without it, it would simulate the run's Adam step, whose per-parameter scaling hides it
    probe = {"every": every, "batch_size": PROBE_ROWS, "lr": 0.01}
    diagnostics = probe if len(task_names) > 1 else None
    trainer = Trainer(
        n_epochs=n_epochs, lr=0.01, seed=seed, progress_bar=False, diagnostics=diagnostics
    )
    trainer.fit(model, data)
    scores = model.score([dl for dl in data if dl.dataset.split == "test"])
    return scores, trainer.diagnostics


def main(
    n_items: int | None = None,
    n_epochs: int = 10,
    every: int = 5,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the four steps; returns the digit scores, the reports, and the scores of each step.

    Args:
        n_items: Products in the pool (``None``: all 1,797 digits), split into three datasets.
        n_epochs: Epochs of each training run.
        every: Optimizer steps between interference probes.
        seed: Seed of the data, the weights and the training order.
        verbose: Print the steps, the scores and the diagnostics report.
    """
    say = print if verbose else (lambda *args: None)
    loaders = make_loaders(n_items, seed)
    example = loaders["digit_task"][0].dataset
    words = " ".join(DIGIT_WORDS[int(t)] for t in example.X_dict["text"][0] if int(t))
    say(f"a product: an 8x8 tag image and the description {words!r}")
    key = "digit_task/catalog/test/accuracy"

    steps: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "1 digit alone": (["digit_task"], None),
        "2 digit + loop, shared image trunk": (["digit_task", "loop_task"], None),
        "3 + price on the shared image trunk": (["digit_task", "loop_task", "price_task"], None),
        "4 price on its own image trunk": (
            ["digit_task", "loop_task", "price_task"],
            {"price_task": "price_image_trunk"},
        ),
    }
    scores: dict[str, dict[str, float]] = {}
    reports: dict[str, DiagnosticsReport | None] = {}
    for name, (task_names, trunks) in steps.items():
        scores[name], reports[name] = train(loaders, task_names, trunks, n_epochs, every, seed)
        shown = ", ".join(
            f"{key.split('/')[0]} {key.split('/')[-1]} {value:.3f}"
            for key, value in scores[name].items()
        )
        say(f"step {name}: {shown}")

    baseline = scores["1 digit alone"][key]
    hurt = scores["3 + price on the shared image trunk"][key]
    fixed = scores["4 price on its own image trunk"][key]
    report = reports["3 + price on the shared image trunk"]
    assert report is not None
    say("\nThe diagnostics of step 3:\n")
    say(report.to_text())
    say(
        f"\ndigit_task test accuracy: {baseline:.3f} alone, {hurt:.3f} sharing its image trunk "
        f"with price_task, {fixed:.3f} once price_task has its own trunk"
    )
    assert hurt < baseline - 0.1, "adding price_task should hurt digit_task"
    assert fixed > baseline - 0.05, "its own trunk should give digit_task its score back"
    return {
        "baseline": baseline,
        "shared": hurt,
        "separate": fixed,
        "scores": scores,
        "reports": reports,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=None, help="products in the pool")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(n_items=args.items, n_epochs=args.epochs, seed=args.seed)
