"""Any torch optimizer by name or dotted path, and warm-up in steps, epochs or a fraction."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import ConfigError, MultitaskClassifier, Trainer
from mtlgraph.training.lr import resolve_warmup
from mtlgraph.training.optim import OPTIMIZERS, torch_optimizers


def _setup() -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    model = MultitaskClassifier([make_task("a", nn.Sequential(nn.Linear(2, 4), nn.ReLU()))])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return model, [make_loader("A", "train", {"x": x}, {"a": y}, 16)]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamax", torch.optim.Adamax),
        ("RMSprop", torch.optim.RMSprop),
        ("rmsprop", torch.optim.RMSprop),
        ("adagrad", torch.optim.Adagrad),
        ("nadam", torch.optim.NAdam),
        ("radam", torch.optim.RAdam),
        ("ADAM", torch.optim.Adam),
        ("torch.optim.ASGD", torch.optim.ASGD),
    ],
)
def test_any_torch_optimizer_by_name_or_path_trains(name: str, cls: type) -> None:
    model, loaders = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(n_epochs=1, optimizer=name, progress_bar=False)
    trainer.fit(model, loaders)
    assert type(trainer.optimizer) is cls
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_optimizer_kwargs_are_checked_against_the_torch_signature() -> None:
    model, loaders = _setup()
    trainer = Trainer(optimizer={"name": "rmsprop", "alpha": 0.9, "momentum": 0.5})
    trainer.config.progress_bar = False
    trainer.fit(model, loaders)
    group = trainer.optimizer.param_groups[0]
    assert (group["alpha"], group["momentum"]) == (0.9, 0.5)
    with pytest.raises(ConfigError, match=r"optimizer 'rmsprop' takes no argument 'alpah' "):
        Trainer(optimizer={"name": "rmsprop", "alpah": 0.9})
    with pytest.raises(ConfigError, match=r"(did you mean 'alpha'\?)"):
        Trainer(optimizer={"name": "rmsprop", "alpah": 0.9})


def test_unknown_and_unsupported_optimizers_are_clear_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown optimizer 'adamxa' \(did you mean 'adamax'\?\)"
    ):
        Trainer(optimizer="adamxa")
    with pytest.raises(ConfigError, match=r"optimizer 'LBFGS' cannot be used: it needs a closure"):
        Trainer(optimizer="LBFGS")
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg.Opt': no module named"):
        Trainer(optimizer="no_such_pkg.Opt")
    with pytest.raises(
        ConfigError,
        match=r"'torch.nn.Linear' is the class Linear, not a Optimizer subclass or a function",
    ):
        Trainer(optimizer="torch.nn.Linear")
    with pytest.raises(ConfigError, match=r"optimizer 'rprop' takes no weight_decay"):
        Trainer(optimizer="rprop", weight_decay=0.1)
    assert "lbfgs" not in torch_optimizers() and "adamax" in torch_optimizers()
    assert OPTIMIZERS.resolve("sgd")[0] is torch.optim.SGD


def test_rprop_without_weight_decay_trains() -> None:
    model, loaders = _setup()
    trainer = Trainer(optimizer="rprop", progress_bar=False)
    trainer.fit(model, loaders)
    assert type(trainer.optimizer) is torch.optim.Rprop


def test_warmup_in_epochs_or_fraction() -> None:
    assert resolve_warmup(0, 1.5, 0.0, [4, 4, 4]) == 6
    assert resolve_warmup(0, 0.0, 0.25, [4, 4, 4]) == 3
    assert resolve_warmup(5, 0.0, 0.0, [4, 4, 4]) == 5
    expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1]
    for key, value in (("warmup_steps", 4), ("warmup_epochs", 1.0), ("warmup_fraction", 0.5)):
        model, loaders = _setup()  # 4 optimizer steps per epoch, 2 epochs
        trainer = Trainer(
            n_epochs=2, lr=0.1, progress_bar=False, evaluation_unit="steps", **{key: value}
        )
        trainer.fit(model, loaders)
        lrs = [r["model/all/train/lr"] for r in trainer.history]
        assert lrs == pytest.approx(expected), key


def test_warmup_factor_rises_over_the_resolved_steps() -> None:
    from mtlgraph.training.lr import lr_factor_fn

    f = lr_factor_fn("constant", resolve_warmup(0, 1.0, 0.0, [4, 4]), 8)
    assert f is not None and [f(s, 0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_two_warmup_keys_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"warm-up is set twice \(warmup_steps=3, warmup_epochs"):
        Trainer(warmup_steps=3, warmup_epochs=1.0)
    with pytest.raises(ConfigError, match=r"warmup_fraction: must be in \[0, 1\], got 2.0"):
        Trainer(warmup_fraction=2.0)


def test_yaml_names_any_torch_optimizer_and_a_warmup_fraction(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from experiment_helpers import tiny_config, write_config

    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    cfg = tiny_config(optimizer={"name": "Adamax", "betas": [0.8, 0.99]}, warmup_fraction=0.5)
    exp = build_experiment(load_config(write_config(tmp_path / "c.yaml", cfg)))
    exp.trainer.fit(exp.model, exp.loaders)
    assert type(exp.trainer.optimizer) is torch.optim.Adamax
    assert exp.trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    cfg = tiny_config(optimizer="adamx")
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamx' \(did you mean 'adam"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


def test_classes_and_instances_are_specs_too() -> None:
    from mtlgraph.balancing import SumBalancer

    model, loaders = _setup()
    trainer = Trainer(
        optimizer={"name": torch.optim.NAdam, "momentum_decay": 0.01},
        balancer=SumBalancer,
        progress_bar=False,
    )
    trainer.fit(model, loaders)
    assert type(trainer.optimizer) is torch.optim.NAdam
    assert trainer.optimizer.param_groups[0]["momentum_decay"] == 0.01
    assert type(trainer.balancer) is SumBalancer
    with pytest.raises(ConfigError, match=r"optimizer.momentum_decay: expected a number"):
        Trainer(optimizer={"name": torch.optim.NAdam, "momentum_decay": "fast"})
