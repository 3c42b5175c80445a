"""Loss scales, per-head learning rates and stop-gradient: Taboola's three lessons.

Taboola predicts several KPIs of a feed item from the same features with one network. Their
lessons, each a few lines of mtlgraph:

1. **Combining losses.** A click (a probability, BCE ~ 0.7) and a dwell time in seconds (MSE in
   the thousands) on one shared trunk: with a plain sum the dwell loss owns the shared layers and
   the click task learns poorly. Uncertainty weighting (Kendall et al.; the ``uncertainty``
   balancer) learns one log-variance per task and brings the losses to one scale.
2. **Tuning learning rates.** One learning rate for the shared trunk, another for the heads:
   ``param_groups`` takes module-name patterns (``"*_head"``); the scheduled learning rate of each
   group is logged under ``model/all/train/lr/<pattern>``.
3. **Using estimates as features.** The dwell head reads the click head's estimate next to the
   trunk's features. The click head has its own labels, so the dwell loss must not push on it: a
   stop-gradient edge (``detach("click_head")``) feeds the value without its gradient. We check it
   by asking autograd which parameters the dwell loss reaches.

Run: ``python tutorials/04_loss_scales_lrs_and_stop_gradient.py``
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    Task,
    Trainer,
    detach,
)
from mtlgraph.data.synthetic import make_kpi_dataset
from mtlgraph.graph.modules import Concat


def kpi_loaders(
    x: torch.Tensor, labels: dict[str, torch.Tensor], seed: int
) -> list[DictDataLoader]:
    """80/20 train/valid loaders of one dataset that labels every KPI."""
    cut = int(0.8 * len(x))
    return [
        DictDataLoader(
            DictDataset("feed", split, {"x": x[rows]}, {t: y[rows] for t, y in labels.items()}),
            batch_size=32,
            shuffle=split == "train",
            seed=seed,
        )
        for split, rows in (("train", slice(0, cut)), ("valid", slice(cut, None)))
    ]


# --------------------------------------------------------------------- lesson 1: loss scales


def scales_problem(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clicks follow one direction of the features, dwell seconds another (x100 in scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    w = torch.linalg.qr(torch.randn(10, 2, generator=g))[0]  # two orthogonal directions
    click = (torch.rand(n, generator=g) < torch.sigmoid(3 * (x @ w[:, 0]))).long()
    dwell = 100 * (x @ w[:, 1] + 0.2 * torch.randn(n, generator=g))
    return x, {"click_task": click, "dwell_task": dwell}


def kpi_model(seed: int) -> MultitaskClassifier:
    """A narrow shared trunk (2 units: one per KPI direction) and a head per KPI."""
    torch.manual_seed(seed)
    trunk = nn.Linear(10, 2)
    click = Task(
        "click_task",
        {"trunk": trunk, "click_head": nn.Linear(2, 1)},
        [Operation("trunk", [("_input_", "x")]), Operation("click_head", ["trunk"])],
        task_type="binary",
        scorer=Scorer(metrics=["accuracy", "roc_auc"]),
    )
    dwell = Task(
        "dwell_task",
        {"trunk": trunk, "dwell_head": nn.Linear(2, 1)},
        [Operation("trunk", [("_input_", "x")]), Operation("dwell_head", ["trunk"])],
        task_type="regression",
    )
    return MultitaskClassifier([click, dwell])


def lesson_1(n: int, n_epochs: int, seed: int) -> dict[str, dict[str, float]]:
    x, labels = scales_problem(n, seed)
    loaders = kpi_loaders(x, labels, seed)
    results = {}
    for name, balancer in (("sum", "sum"), ("uncertainty", {"name": "uncertainty", "lr": 0.1})):
        model = kpi_model(seed)
        trainer = Trainer(
            n_epochs=n_epochs, lr=0.03, balancer=balancer, progress_bar=False, seed=seed
        )
        trainer.fit(model, loaders)
        last = trainer.history[-1]
        results[name] = {
            "click_auc": last["click_task/feed/valid/roc_auc"],
            "dwell_r2": last["dwell_task/feed/valid/r2"],
            "click_weight": last["model/all/train/weight/click_task"],
            "dwell_weight": last["model/all/train/weight/dwell_task"],
        }
    return results


# --------------------------------------------------------------- lesson 2: per-head rates


def lesson_2(n: int, n_epochs: int, seed: int) -> dict[str, Any]:
    x, labels = scales_problem(n, seed)
    model = kpi_model(seed)
    trainer = Trainer(
        n_epochs=n_epochs,
        lr=0.03,  # the default group: every parameter no pattern matches
        param_groups={"trunk": {"lr": 0.01}, "*_head": {"lr": 0.05, "weight_decay": 0.0}},
        warmup_steps=100,  # schedules scale every group's learning rate alike
        balancer={"name": "uncertainty", "lr": 0.1},
        progress_bar=False,
        seed=seed,
    )
    trainer.fit(model, kpi_loaders(x, labels, seed))
    first, last = trainer.history[0], trainer.history[-1]
    return {
        "lr_trunk": (first["model/all/train/lr/trunk"], last["model/all/train/lr/trunk"]),
        "lr_heads": (first["model/all/train/lr/*_head"], last["model/all/train/lr/*_head"]),
        "click_auc": last["click_task/feed/valid/roc_auc"],
        "dwell_r2": last["dwell_task/feed/valid/r2"],
    }


# --------------------------------------------------------------- lesson 3: stop-gradient


def estimate_as_feature_model(seed: int, stop_gradient: bool) -> MultitaskClassifier:
    """The dwell head reads [trunk features, click logit]; the edge from click_head is detached."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    click_head = nn.Linear(16, 1)
    click = Task(
        "click_task",
        {"trunk": trunk, "click_head": click_head},
        [Operation("trunk", [("_input_", "x")]), Operation("click_head", ["trunk"])],
        task_type="binary",
    )
    estimate = detach("click_head") if stop_gradient else "click_head"
    dwell = Task(
        "dwell_task",
        {
            "trunk": trunk,
            "click_head": click_head,
            "with_click": Concat(),
            "dwell_head": nn.Linear(17, 1),
        },
        [
            Operation("trunk", [("_input_", "x")]),
            Operation("click_head", ["trunk"]),  # the same node as click_task's: computed once
            Operation("with_click", ["trunk", estimate]),
            Operation("dwell_head", ["with_click"]),
        ],
        task_type="regression",
    )
    return MultitaskClassifier([click, dwell])


def lesson_3(n: int, n_epochs: int, seed: int) -> dict[str, Any]:
    data = make_kpi_dataset(n, seed=seed)
    x = torch.from_numpy(data["train"]["x"])
    labels = {
        "click_task": torch.from_numpy(data["train"]["click"]),
        "dwell_task": torch.from_numpy(data["train"]["dwell"]),
    }
    reached = {}
    for stop in (True, False):
        model = estimate_as_feature_model(seed, stop_gradient=stop)
        losses, _ = model.calculate_loss({"x": x[:64]}, {"dwell_task": labels["dwell_task"][:64]})
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(losses["dwell_task"], list(params.values()), allow_unused=True)
        reached[stop] = sorted(
            name.split(".")[1] for name, g in zip(params, grads, strict=True) if g is not None
        )
    model = estimate_as_feature_model(seed, stop_gradient=True)
    valid = {"x": torch.from_numpy(data["valid"]["x"])}
    loaders = kpi_loaders(
        torch.cat([x, valid["x"]]),
        {
            "click_task": torch.cat(
                [labels["click_task"], torch.from_numpy(data["valid"]["click"])]
            ),
            "dwell_task": torch.cat(
                [labels["dwell_task"], torch.from_numpy(data["valid"]["dwell"])]
            ),
        },
        seed,
    )
    trainer = Trainer(n_epochs=n_epochs, lr=0.005, progress_bar=False, seed=seed)
    trainer.fit(model, loaders)
    last = trainer.history[-1]
    return {
        "dwell_loss_reaches_with_stop_gradient": sorted(set(reached[True])),
        "dwell_loss_reaches_without": sorted(set(reached[False])),
        "click_accuracy": last["click_task/feed/valid/accuracy"],
        "dwell_r2": last["dwell_task/feed/valid/r2"],
    }


def main(n: int = 2000, n_epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    return {
        "lesson_1": lesson_1(n, n_epochs, seed),
        "lesson_2": lesson_2(n, n_epochs, seed),
        "lesson_3": lesson_3(n, n_epochs, seed),
    }


def report(result: dict[str, Any]) -> str:
    lines = ["Lesson 1: combining losses (valid)   click AUC   dwell R2   weights (click, dwell)"]
    for name, r in result["lesson_1"].items():
        lines.append(
            f"  {name:<34} {r['click_auc']:9.3f}  {r['dwell_r2']:9.3f}   "
            f"({r['click_weight']:.3g}, {r['dwell_weight']:.3g})"
        )
    r2 = result["lesson_2"]
    lines += [
        "",
        "Lesson 2: per-group learning rates (first -> last evaluation, 100 warm-up steps)",
        f"  trunk   {r2['lr_trunk'][0]:.4g} -> {r2['lr_trunk'][1]:.4g}",
        f"  *_head  {r2['lr_heads'][0]:.4g} -> {r2['lr_heads'][1]:.4g}",
        f"  click AUC {r2['click_auc']:.3f}, dwell R2 {r2['dwell_r2']:.3f}",
    ]
    r3 = result["lesson_3"]
    stopped, plain = r3["dwell_loss_reaches_with_stop_gradient"], r3["dwell_loss_reaches_without"]
    lines += [
        "",
        "Lesson 3: the click estimate as a dwell feature",
        f"  modules the dwell loss reaches, stop-gradient: {stopped}",
        f"  modules the dwell loss reaches, plain edge:    {plain}",
        f"  trained with the stop-gradient: click accuracy {r3['click_accuracy']:.3f}, "
        f"dwell R2 {r3['dwell_r2']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(report(main(n=args.n, n_epochs=args.epochs, seed=args.seed)))
