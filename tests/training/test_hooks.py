"""The loop's internal hooks: one Every trigger, a fixed order (probe, evaluate, save, bar)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Interrupt, make_loader, make_task
from torch import nn

from mtlgraph import MultitaskClassifier, Trainer
from mtlgraph.training.checkpoint import load_checkpoint
from mtlgraph.training.hooks import Every


def test_every_counts_its_own_unit() -> None:
    every = Every(4, "step")
    assert [s for s in range(1, 13) if every.due("step", s)] == [4, 8, 12]
    assert not every.due("epoch", 4)
    assert not Every(0, "epoch").due("epoch", 1)  # 0: never during the run
    assert Every.of(3, "epochs") == Every(3, "epoch") and Every.of(3, "steps").unit == "step"


def _setup(at: int = 0) -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), Interrupt(at))
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    loaders = [
        make_loader("A", "train", {"x": x}, {"a": (x[:, 0] > 0).long()}, 16),
        make_loader("B", "train", {"x": x}, {"b": (x[:, 1] > 0).long()}, 16),
        make_loader("A", "valid", {"x": x[:32]}, {"a": (x[:32, 0] > 0).long()}, 16),
    ]
    return model, loaders


def test_hooks_fire_in_order_probe_evaluate_save(tmp_path: Path) -> None:
    config = {
        "n_epochs": 1,
        "progress_bar": False,
        "run_dir": str(tmp_path),
        "diagnostics": {"every": 4, "batch_size": 8},
        "evaluation_unit": "steps",
        "evaluation_freq": 4,
        "checkpoint_unit": "steps",
        "checkpoint_every": 4,
    }
    model, loaders = _setup(at=6)  # stops in step 6: last.pt is the one of step 4
    with pytest.raises(KeyboardInterrupt):
        Trainer(**config).fit(model, loaders)
    history = load_checkpoint(tmp_path)["run"]["history"]
    # at step 4 the probe's record comes first, then the evaluation's; the save sees both
    assert [r["step"] for r in history] == [4.0, 4.0]
    assert any(k.startswith("diagnostics/") for k in history[0])
    assert "a/A/valid/accuracy" in history[1] and "model/all/train/loss" in history[1]


def test_the_end_evaluates_once_and_saves(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=2, progress_bar=False, run_dir=str(tmp_path), evaluation_freq=2)
    trainer.fit(model, loaders)
    assert [r["step"] for r in trainer.history] == [16.0]  # epoch 2's evaluation; no repeat
    assert load_checkpoint(tmp_path)["run"]["progress"]["global_step"] == 16
    trainer = Trainer(n_epochs=2, progress_bar=False, evaluation_freq=0)
    trainer.fit(*_setup())
    assert [r["step"] for r in trainer.history] == [16.0]  # 0: only after training
