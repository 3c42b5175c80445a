"""Trainer: config validation, the loop's outcomes, history keys, schedules, exact equivalence."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import ConfigError, DataError, MultitaskClassifier, Trainer
from mtlgraph.training.trainer import lr_factor_fn


def _problem(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > 0).long(), (x[:, 1] > 0).long()


def _setup(batch_size: int = 16) -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    model = MultitaskClassifier([make_task("a", trunk, width=8), make_task("b", trunk, width=8)])
    x, ya, yb = _problem()
    loaders = [
        make_loader("A", "train", {"x": x}, {"a": ya}, batch_size, shuffle=True),
        make_loader("B", "train", {"x": x}, {"b": yb}, batch_size, shuffle=True),
        make_loader("A", "valid", {"x": x[:64]}, {"a": ya[:64]}, 64),
        make_loader("B", "valid", {"x": x[:64]}, {"b": yb[:64]}, 64),
    ]
    return model, loaders


def test_config_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        Trainer(
            n_epoch=2,
            lr=-1.0,
            optimizer="adan",
            progress_bar="yes",
            lr_scheduler={"name": "step", "gama": 0.5},
        )
    text = str(info.value)
    assert text.startswith("invalid Trainer config:")
    assert "n_epoch: unknown key (did you mean 'n_epochs'?)" in text
    assert "lr: must be a positive number, got -1.0" in text
    assert "optimizer: unknown optimizer 'adan' (did you mean 'adam'?)" in text
    assert "progress_bar: expected true or false, got the string 'yes'" in text
    assert (
        "lr_scheduler.gama: LR schedule 'step' takes no argument 'gama' (did you mean 'gamma'?)"
        in text
    )
    assert len(info.value.problems) == 5


def test_yaml_style_exponent_string_gets_a_hint() -> None:
    with pytest.raises(
        ConfigError, match=r"lr: expected a number, got the string '1e-3' \(YAML 1.1 reads"
    ):
        Trainer(lr="1e-3")


def test_fit_learns_and_records_history() -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=6, lr=0.05, progress_bar=False)
    trainer.fit(model, loaders)
    assert len(trainer.history) == 6
    last = trainer.history[-1]
    assert last["epoch"] == 6.0 and last["step"] == 6 * 16
    for key in (
        "model/all/train/loss",
        "model/all/train/lr",
        "a/A/train/loss",
        "b/B/train/loss",
        "a/A/valid/accuracy",
        "b/B/valid/accuracy",
        "model/all/train/weight/a",
    ):
        assert key in last, key
    assert last["model/all/train/lr"] == 0.05
    assert last["a/A/valid/accuracy"] >= 0.9 and last["b/B/valid/accuracy"] >= 0.9
    assert trainer.history[0]["model/all/train/loss"] > last["model/all/train/loss"]


def test_training_loss_is_the_count_weighted_mean() -> None:
    model, loaders = _setup(batch_size=50)  # 128 rows -> batches of 50, 50, 28
    trainer = Trainer(
        n_epochs=1, lr=1e-9, optimizer="sgd", progress_bar=False, batch_scheduler="sequential"
    )
    before = copy.deepcopy(model)
    trainer.fit(model, loaders[:1])
    x = loaders[0].dataset.X_dict["x"]
    y = loaders[0].dataset.Y_dict["a"]
    perm = loaders[0].sampler.order()
    batches = [perm[i : i + 50] for i in range(0, 128, 50)]
    losses = [
        F.cross_entropy(before.forward({"x": x[b]}, ["a"])["a_head"], y[b]).item() for b in batches
    ]
    expected = sum(v * len(b) for v, b in zip(losses, batches, strict=True)) / 128
    assert trainer.history[-1]["a/A/train/loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluation_every_n_steps() -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=1, evaluation_freq=5, evaluation_unit="steps", progress_bar=False)
    trainer.fit(model, loaders)
    assert [r["step"] for r in trainer.history] == [5, 10, 15, 16]  # 2 loaders x 8 batches


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    results = []
    for _ in range(2):
        model, loaders = _setup()
        model.module_pool["trunk"].append(nn.Dropout(0.3))
        torch.manual_seed(123)
        random.seed(5)
        Trainer(n_epochs=2, seed=7, progress_bar=False).fit(model, loaders)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    model, loaders = _setup()
    torch.manual_seed(123)
    Trainer(n_epochs=1, progress_bar=False).fit(model, loaders)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [("adam", {}), ("sgd", {"momentum": 0.9}), ("adamw", {"weight_decay": 0.1})],
)
def test_subset_stepping_equals_a_plain_optimizer_loop(optimizer: str, kwargs: dict) -> None:
    model, loaders = _setup()
    reference = copy.deepcopy(model)
    wd = kwargs.pop("weight_decay", 0.0)
    spec = {"name": optimizer, **kwargs}
    Trainer(
        n_epochs=2,
        lr=0.01,
        optimizer=spec,
        weight_decay=wd,
        batch_scheduler="round_robin",
        progress_bar=False,
    ).fit(model, loaders)
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    fast = {"foreach": True} if optimizer == "sgd" else {"fused": True}  # mtlgraph's CPU pick
    opt = cls(reference.parameters(), lr=0.01, weight_decay=wd, **fast, **kwargs)
    train = loaders[:2]
    for epoch in range(2):
        for dl in train:
            dl.set_epoch(epoch)
        iters = [iter(dl) for dl in train]
        for step in range(8):
            for i, name in ((0, "a"), (1, "b")):
                X, Y = next(iters[i])
                losses, _ = reference.calculate_loss(X, Y)
                losses[name].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            del step
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grad_clip_bounds_the_update() -> None:
    model, loaders = _setup(batch_size=128)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(n_epochs=1, lr=1.0, optimizer="sgd", grad_clip=0.01, progress_bar=False).fit(
        model, loaders[:1]
    )
    delta = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert 0 < float(delta.detach()) <= 0.01 + 1e-6


def test_lr_schedules() -> None:
    assert lr_factor_fn("constant", 0, 100) is None
    warm = lr_factor_fn("constant", 4, 100)
    assert warm is not None and [warm(s, 0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = lr_factor_fn("linear", 0, 10)
    assert lin is not None and lin(0, 0) == 1.0 and lin(5, 1) == pytest.approx(0.5)
    cos = lr_factor_fn({"name": "cosine", "min_factor": 0.1}, 0, 10)
    assert cos is not None and cos(0, 0) == 1.0 and cos(5, 1) == pytest.approx(0.55)
    step = lr_factor_fn({"name": "step", "step_size": 2, "gamma": 0.5}, 0, 100)
    assert step is not None and [step(s, s // 10) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    exp = lr_factor_fn({"name": "exponential", "gamma": 0.5}, 0, 100)
    assert exp is not None and exp(25, 2) == 0.25


def test_lr_is_recorded_under_a_schedule() -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=2, lr=0.1, lr_scheduler="linear", progress_bar=False)
    trainer.fit(model, loaders)
    lrs = [r["model/all/train/lr"] for r in trainer.history]
    assert lrs[0] == pytest.approx(0.1 * (1 - 15 / 32)) and lrs[1] == pytest.approx(
        0.1 * (1 - 31 / 32)
    )


def test_loader_problems_are_reported_before_training() -> None:
    model, loaders = _setup()
    x, ya, _ = _problem(8)
    bad = make_loader("C", "train", {"x": x}, {"a_tsk": ya})
    with pytest.raises(DataError) as info:
        Trainer(progress_bar=False).fit(model, [*loaders, bad, loaders[0]])
    text = str(info.value)
    assert "dataloaders[0] and dataloaders[5] are both dataset 'A' split 'train'" in text
    with pytest.raises(
        DataError, match="labels 'a_tsk', which is no task of the model; the model has 'a', 'b'"
    ):
        Trainer(progress_bar=False).fit(model, [*loaders, bad])
    with pytest.raises(DataError, match="no loader has split 'train'"):
        Trainer(progress_bar=False).fit(model, loaders[2:])


def test_batches_with_only_ignored_labels_do_not_step() -> None:
    # (a dataset whose training labels are ALL ignored is an error: tests/bad_inputs)
    x, y = torch.randn(16, 2), torch.cat([torch.full((8,), -1), torch.tensor([0, 1] * 4)])
    fitted = []
    for rows in (slice(0, 16), slice(8, 16)):  # with the ignored batch first, and without it
        model, _ = _setup()
        loader = make_loader("A", "train", {"x": x[rows]}, {"a": y[rows]})
        Trainer(n_epochs=1, progress_bar=False).fit(model, [loader])
        fitted.append(list(model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*fitted, strict=True))


def test_mixed_scheduler_trains_all_tasks_each_step() -> None:
    model, loaders = _setup()
    short = make_loader("B", "train", {"x": _problem(32)[0]}, {"b": _problem(32)[2]}, 16)
    trainer = Trainer(n_epochs=1, batch_scheduler="mixed", progress_bar=False)
    trainer.fit(model, [loaders[0], short])
    assert trainer.history[-1]["step"] == 8  # the longest loader's batches; the short one cycles
    assert math.isfinite(trainer.history[-1]["b/B/train/loss"])
