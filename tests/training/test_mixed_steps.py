"""Steps that hold several tasks: the ``mixed`` batch scheduler (one batch of every loader per
step, shorter loaders cycling) and datasets whose ``Y_dict`` labels several tasks."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.balancing import StepContext, SumBalancer
from mtlgraph.data.schedulers import MixedScheduler


class Recorder(SumBalancer):
    """The sum balancer, recording each step's losses and label counts."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, tuple[float, int]]] = []

    def backward(self, losses: Mapping[str, torch.Tensor], ctx: StepContext) -> None:
        self.steps.append({t: (loss.item(), ctx.counts[t]) for t, loss in losses.items()})
        super().backward(losses, ctx)


class RowProbe(nn.Module):
    """Identity that records the first column (a row id) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.batches.append([int(v) for v in x[:, 0].tolist()])
        return x


def make_model(probe: nn.Module | None = None) -> MultitaskClassifier:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    pool_b: dict[str, nn.Module] = {"trunk": trunk, "b_head": nn.Linear(8, 2)}
    ops_b = [Operation("trunk", [("_input_", "x")]), Operation("b_head", ["trunk"])]
    if probe is not None:
        pool_b["probe"] = probe
        ops_b = [Operation("probe", [("_input_", "x")]), Operation("trunk", ["probe"]), ops_b[1]]
    tasks = [
        Task(
            "a",
            {"trunk": trunk, "a_head": nn.Linear(8, 2)},
            [Operation("trunk", [("_input_", "x")]), Operation("a_head", ["trunk"])],
        ),
        Task("b", pool_b, ops_b),
    ]
    return MultitaskClassifier(tasks)


def rows(n: int, offset: int = 0) -> torch.Tensor:
    """Inputs whose first column is the row id."""
    ids = torch.arange(offset, offset + n, dtype=torch.float32)
    return torch.stack([ids, torch.zeros(n)], dim=1)


def test_mixed_plan_takes_every_loader_each_step_until_the_longest_ends() -> None:
    assert MixedScheduler().epoch_plan([3, 1, 2]) == [(0, 1, 2)] * 3
    assert MixedScheduler().epoch_plan([2, 0, 1]) == [(0, 2)] * 2  # empty loaders left out


def test_mixed_steps_hold_every_task_and_shorter_loaders_cycle() -> None:
    probe = RowProbe()
    model = make_model(probe)
    a = DictDataLoader(
        DictDataset("da", "train", {"x": rows(12)}, {"a": torch.zeros(12, dtype=torch.long)}),
        batch_size=4,
    )
    b = DictDataLoader(
        DictDataset("db", "train", {"x": rows(8, 100)}, {"b": torch.ones(8, dtype=torch.long)}),
        batch_size=4,
    )
    recorder = Recorder()
    trainer = Trainer(n_epochs=2, batch_scheduler="mixed", balancer=recorder, progress_bar=False)
    trainer.fit(model, [a, b])
    assert trainer.global_step == 6  # 3 steps per epoch: the longest loader's batches
    assert all(set(step) == {"a", "b"} for step in recorder.steps)
    first, second = [100, 101, 102, 103], [104, 105, 106, 107]
    assert probe.batches == [first, second, first] * 2  # b cycles within each epoch


def test_a_dataset_labelling_several_tasks_gives_multi_task_steps() -> None:
    model = make_model()
    x = torch.randn(8, 2)
    labels_b = torch.tensor([1, -1, 0, -1, 1, 1, 0, 0])  # -1: not labelled for b
    ds = DictDataset("d", "train", {"x": x}, {"a": (x[:, 0] > 0).long(), "b": labels_b})
    recorder = Recorder()
    Trainer(n_epochs=1, balancer=recorder, progress_bar=False).fit(
        model, [DictDataLoader(ds, batch_size=4)]
    )
    assert [{t: n for t, (_, n) in s.items()} for s in recorder.steps] == [
        {"a": 4, "b": 2},
        {"a": 4, "b": 4},
    ]


def test_one_task_labelled_by_two_batches_of_a_step_is_count_weighted() -> None:
    model = make_model()
    x1, x2 = torch.randn(4, 2), torch.randn(2, 2)
    y1, y2 = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1])
    train = [
        DictDataLoader(DictDataset("d1", "train", {"x": x1}, {"a": y1}), batch_size=4),
        DictDataLoader(DictDataset("d2", "train", {"x": x2}, {"a": y2}), batch_size=2),
    ]
    recorder = Recorder()
    trainer = Trainer(
        n_epochs=1, batch_scheduler="mixed", balancer=recorder, lr=1e-9, progress_bar=False
    )
    trainer.fit(model, train)
    with torch.no_grad():
        expected, _ = model.calculate_loss({"x": torch.cat([x1, x2])}, {"a": torch.cat([y1, y2])})
    ((loss, count),) = recorder.steps[0].values()
    assert count == 6 and loss == pytest.approx(expected["a"].item(), rel=1e-5)


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "mgda", "gradnorm"])
def test_multi_task_methods_see_several_tasks_with_mixed_steps(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model()
    x = torch.randn(32, 2)
    train = [
        DictDataLoader(DictDataset(f"d{t}", "train", {"x": x}, {t: (x[:, i] > 0).long()}), 8)
        for i, t in enumerate(("a", "b"))
    ]
    trainer = Trainer(n_epochs=1, batch_scheduler="mixed", balancer=name, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="mtlgraph.balancing"):
        trainer.fit(model, train)
    assert not [r for r in caplog.records if "holds only task" in r.getMessage()]
    assert set(trainer.balancer.weights()) == {"a", "b"}
    assert trainer.balancer.weights() != {"a": 1.0, "b": 1.0}
