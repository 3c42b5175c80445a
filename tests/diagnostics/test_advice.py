"""Advice that is right: the lookahead affinity takes the run optimizer's step, and the
loss-scale warning weighs the losses by the task weights, once per run."""

from __future__ import annotations

import copy
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    Hook,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor
from mtlgraph.diagnostics.monitor import optimizer_step
from mtlgraph.exceptions import TrainingInterrupted
from mtlgraph.training.hooks import warn_loss_scales


def _two_tasks() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """w = (w0, w1) = 0 shared by two regression tasks. Task a (x = (1, 0.01), target 10)
    pulls mostly along w0; task b (x = (1, -2), target 1) gains from w0 and loses from w1.
    SGD's step for a moves w by (1, 0.01): b's prediction goes to 0.98 (helped); Adam's
    first step moves w by (0.05, 0.05): b's prediction goes to -0.05 (hurt)."""
    trunk = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(trunk.weight)
    tasks = [
        Task(t, {"trunk": trunk}, [Operation("trunk", [("_input_", "x")])], task_type="regression")
        for t in ("a", "b")
    ]
    xa, xb = torch.tensor([[1.0, 0.01]]).repeat(8, 1), torch.tensor([[1.0, -2.0]]).repeat(8, 1)
    loaders = [
        DictDataLoader(DictDataset("da", "train", {"x": xa}, {"a": torch.full((8,), 10.0)}), 8),
        DictDataLoader(DictDataset("db", "train", {"x": xb}, {"b": torch.full((8,), 1.0)}), 8),
    ]
    return MultitaskClassifier(tasks), loaders


@pytest.mark.parametrize(
    ("make", "a_to_b"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.05), 1 - (0.98 - 1) ** 2),  # helps b
        (lambda ps: torch.optim.Adam(ps, lr=0.05), 1 - (-0.05 - 1) ** 2),  # hurts b
    ],
    ids=["sgd", "adam"],
)
def test_the_lookahead_takes_the_step_of_the_runs_optimizer(make: Any, a_to_b: float) -> None:
    model, loaders = _two_tasks()
    optimizer = make(model.parameters())
    values = InterferenceMonitor(DiagnosticsConfig(every=1)).probe(model, loaders, optimizer, 1)
    assert values["diagnostics/trunk/a~b/cosine"] > 0  # the gradients agree either way
    assert values["diagnostics/affinity/a->b"] == pytest.approx(a_to_b, abs=1e-4)


def test_a_fixed_lookahead_lr_takes_a_plain_gradient_step() -> None:
    model, loaders = _two_tasks()
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    values = InterferenceMonitor(DiagnosticsConfig(every=1, lr=0.05)).probe(model, loaders, adam, 1)
    assert values["diagnostics/affinity/a->b"] == pytest.approx(1 - (0.98 - 1) ** 2, abs=1e-4)


def test_the_simulated_step_equals_the_optimizers_and_leaves_it_untouched() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    adam = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    for _ in range(3):  # moments and a step count in the state
        w.grad = torch.randn(3)
        adam.step()
    before, state = w.detach().clone(), copy.deepcopy(adam.state_dict())
    g = torch.randn(3)
    simulated = optimizer_step(adam, [w], [g])[0]
    assert torch.equal(w.detach(), before) and str(adam.state_dict()) == str(state)
    w.grad = g
    adam.step()
    assert torch.equal(simulated, w.detach())


class _Snapshot(Hook):
    """A copy of the model and its optimizer after step 1 (the probe leaves both as found)."""

    def on_step_end(self, run: Any) -> None:
        if run.global_step == 1:
            self.copy = copy.deepcopy((run.model, run.optimizer))


def test_the_trainer_probes_with_its_optimizer() -> None:
    model, loaders = _two_tasks()
    snapshot = _Snapshot()
    trainer = Trainer(
        n_epochs=1,
        lr=0.05,
        optimizer="adam",
        progress_bar=False,
        diagnostics={"every": 1},
        hooks=[snapshot],
    )
    trainer.fit(model, loaders)
    logged = next(r for r in trainer.history if "diagnostics/affinity/a->b" in r)
    at_step_1, adam = snapshot.copy
    monitor = InterferenceMonitor(DiagnosticsConfig(every=1))
    again = monitor.probe(at_step_1, loaders, adam, 1)
    plain = InterferenceMonitor(DiagnosticsConfig(every=1)).probe(at_step_1, loaders, 0.05, 1)
    assert logged["diagnostics/affinity/a->b"] == again["diagnostics/affinity/a->b"]
    assert abs(plain["diagnostics/affinity/a->b"] - logged["diagnostics/affinity/a->b"]) > 0.5


# ---------------------------------------------------------------- the loss-scale warning


def test_the_loss_scale_warning_weighs_the_losses_by_the_task_weights() -> None:
    record = {"cls/d/train/loss": 0.7, "reg/d/train/loss": 0.001}
    message = warn_loss_scales(record, ["reg"], {"cls": 1.0, "reg": 2.0})
    assert message is not None
    assert "differ by 350x once weighted by the task weights" in message
    assert "task 'reg': 0.002 = 2 x 0.001" in message and "to about 700" in message
    assert warn_loss_scales(record, ["reg"], {"reg": 100.0}) is None  # 0.7 vs 0.1: fine
    # a weight can also make the gap: a 1000-weighted regression loss next to a classifier's
    assert warn_loss_scales({"c/d/train/loss": 0.5, "r/d/train/loss": 1.0}, ["r"], {"r": 1e3})


class _TermAt(Hook):
    def on_step_end(self, run: Any) -> None:
        if run.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)


def _scaled() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    ops = [Operation("trunk", [("_input_", "x")])]
    cls = Task("cls", {"trunk": trunk, "c": nn.Linear(4, 10)}, [*ops, Operation("c", ["trunk"])])
    head = nn.Linear(4, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    reg = Task(
        "reg",
        {"trunk": trunk, "r": head},
        [*ops, Operation("r", ["trunk"])],
        task_type="regression",
    )
    x = torch.randn(64, 2)
    labels = {"cls": torch.randint(0, 10, (64,)), "reg": 1e-3 * x[:, 0]}
    return MultitaskClassifier([cls, reg]), [DictDataLoader(DictDataset("d", "train", {"x": x}, labels), 8)]  # fmt: skip


def test_the_loss_scale_warning_is_said_once_per_run_resumes_included(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg: dict[str, Any] = {
        "n_epochs": 2,
        "progress_bar": False,
        "evaluation_unit": "steps",
        "evaluation_freq": 1,
        "run_dir": str(tmp_path),
    }
    model, loaders = _scaled()
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        with pytest.raises(TrainingInterrupted):
            Trainer(**cfg, hooks=[_TermAt()]).fit(model, loaders)
        assert caplog.text.count("the task losses differ by") == 1
        caplog.clear()
        model, loaders = _scaled()
        Trainer(**cfg).fit(model, loaders, resume_from=tmp_path)
    assert "the task losses differ by" not in caplog.text
