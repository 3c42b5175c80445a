"""Sampling batch schedulers: formulas, frequencies, determinism, errors, and in the Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtlgraph import (
    ConfigError,
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.data.schedulers import SCHEDULERS
from mtlgraph.training.config import TrainerConfig


def _configured(spec, sizes, steps=10_000, n_epochs=1, names=None):  # type: ignore[no-untyped-def]
    s = SCHEDULERS.build(spec, seed=0)
    s.configure(names or [f"d{i}" for i in range(len(sizes))], sizes, steps, n_epochs)
    return s


def test_temperature_frequencies_are_within_2_percent_of_the_formula_over_10k_steps() -> None:
    sizes = [50_000, 5_000, 500, 50]
    s = _configured({"name": "temperature", "temperature": 3.0, "cap": 20_000}, sizes)
    w = np.minimum(sizes, 20_000) ** (1 / 3.0)
    expected = w / w.sum()
    plan = s.epoch_plan([1] * 4)
    freq = np.bincount([i for (i,) in plan], minlength=4) / len(plan)
    assert len(plan) == 10_000
    assert np.abs(freq - expected).max() < 0.02
    assert np.allclose(s.probabilities(0), expected)


def test_formulas() -> None:
    assert _configured("uniform", [1, 9]).probabilities(0).tolist() == [0.5, 0.5]
    assert _configured("proportional", [1, 3]).probabilities(0).tolist() == [0.25, 0.75]
    annealed = _configured("annealed", [4, 1], n_epochs=5)
    for e in range(5):
        alpha = 1 - 0.8 * e / 4
        assert np.allclose(annealed.probabilities(e), np.array([4, 1]) ** alpha / (4**alpha + 1))
    weighted = _configured(
        {"name": "weighted", "weights": {"b": 1, "a": 3}}, [None, None], names=["a", "b"]
    )
    assert weighted.probabilities(0).tolist() == [0.75, 0.25]


def test_plans_are_deterministic_and_resume_from_the_state() -> None:
    a = _configured("temperature", [100, 10], steps=50, n_epochs=3)
    b = _configured("temperature", [100, 10], steps=50, n_epochs=3)
    first = a.epoch_plan([1, 1])
    state = a.state_dict()
    second = a.epoch_plan([1, 1])
    assert b.epoch_plan([1, 1]) == first
    b.load_state_dict(state)
    assert b.epoch_plan([1, 1]) == second
    assert a.epoch_lengths([1, 1], 3) == [50, 50, 50]


def test_errors_name_the_dataset_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="size of stream 's' is unknown"):
        _configured("proportional", [10, None], names=["d", "s"])
    with pytest.raises(ConfigError) as err:
        _configured({"name": "weighted", "weights": {"aa": 1, "c": -1}}, [1, 1], names=["a", "b"])
    text = str(err.value)
    assert "no entry for dataset 'a'" in text and "no entry for dataset 'b'" in text
    assert "'aa', which is no training dataset (did you mean 'a'?)" in text
    assert "weights['c'] must be a finite number >= 0" in text
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        _configured({"name": "temperature", "temperature": 0}, [1, 1])


def _setup(at: int = 0):  # type: ignore[no-untyped-def]
    from conftest import Interrupt

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.3))
    stop = Interrupt(at)
    tasks = [
        Task(
            t,
            {"trunk": trunk, "stop": stop, f"{t}_head": nn.Linear(8, 2)},
            [
                Operation("trunk", [("_input_", "x")]),
                Operation("stop", ["trunk"]),
                Operation(f"{t}_head", ["stop"]),
            ],
        )
        for t in ("a", "b")
    ]
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(96, 2, generator=g), torch.randn(12, 2, generator=g)
    loaders = [
        DictDataLoader(
            DictDataset("da", "train", {"x": xa}, {"a": (xa[:, 0] > 0).long()}),
            batch_size=16,
            shuffle=True,
            seed=5,
        ),
        DictDataLoader(
            DictDataset("db", "train", {"x": xb}, {"b": (xb[:, 1] > 0).long()}),
            batch_size=4,
            shuffle=True,
            seed=6,
        ),  # 3 batches: restarts often
    ]
    return MultitaskClassifier(tasks), loaders


CONFIG = {
    "n_epochs": 2,
    "lr": 0.02,
    "progress_bar": False,
    "batch_scheduler": "uniform",
    "steps_per_epoch": 20,
    "checkpoint_every": 7,
    "checkpoint_unit": "steps",
    "evaluation_freq": 0,
}


def test_an_epoch_is_steps_per_epoch_and_exhausted_loaders_restart_with_a_fresh_shuffle() -> None:
    _, loaders = _setup()
    small = loaders[1]
    seen = []
    small.set_epoch(0)
    for p in range(3):
        small.set_pass(p)
        seen.append(torch.cat([y["b"] * 0 + x["x"][:, 0] for x, y in small]).tolist())
    assert seen[0] != seen[1] != seen[2] and sorted(seen[0]) == sorted(seen[1])
    model, loaders = _setup()
    trainer = Trainer(**{k: v for k, v in CONFIG.items() if "checkpoint" not in k})
    trainer.fit(model, loaders)
    assert trainer.global_step == 40


def test_resume_under_a_sampling_scheduler_is_bit_identical(tmp_path: Path) -> None:
    model, loaders = _setup()
    Trainer(run_dir=str(tmp_path / "ref"), **CONFIG).fit(model, loaders)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model, loaders = _setup(at=31)  # epoch 2, after the small loader restarted
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **CONFIG).fit(model, loaders)
    model, loaders = _setup()
    Trainer(run_dir=str(tmp_path / "run"), **CONFIG).fit(
        model, loaders, resume_from=tmp_path / "run"
    )
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_temperature_rules_are_checked_when_the_trainer_is_built() -> None:
    spec = {"name": "temperature", "temperature": 0, "cap": -1}
    assert TrainerConfig(batch_scheduler=spec).validate() == [
        "batch_scheduler: temperature must be > 0, got 0.0",
        "batch_scheduler: cap must be a positive number of examples, got -1",
    ]
