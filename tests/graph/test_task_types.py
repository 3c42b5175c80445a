"""Task types: default loss, output function and metrics per type, label masking (rows, and
elements for multilabel / multi-output regression), explicit arguments winning, static weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import nn

from mtlgraph import (
    DataError,
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    Task,
    TaskDefinitionError,
    Trainer,
)


def make_task(
    task_type: str, out_dim: int, name: str = "t", in_dim: int = 3, **kwargs: object
) -> Task:
    return Task(
        name,
        {f"{name}_m": nn.Linear(in_dim, out_dim)},
        [Operation(f"{name}_m", [("_input_", "x")])],
        task_type=task_type,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def outputs(model: MultitaskClassifier, x: torch.Tensor, name: str = "t") -> torch.Tensor:
    return model.forward({"x": x}, [name])[f"{name}_m"]


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("task_type", "metrics", "output"),
    [
        ("multiclass", ["accuracy"], "softmax"),
        ("binary", ["accuracy"], "sigmoid"),
        ("multilabel", ["accuracy"], "sigmoid"),
        ("regression", ["mse", "mae", "r2"], "identity"),
    ],
)
def test_defaults_per_task_type(task_type: str, metrics: list[str], output: str) -> None:
    task = make_task(task_type, 3)
    assert task.task_type == task_type
    assert task.scorer.metric_keys == metrics
    z = torch.randn(4, 3)
    expected = {
        "softmax": F.softmax(z, dim=1),
        "sigmoid": torch.sigmoid(z),
        "identity": z,
    }[output]
    assert torch.allclose(task.output_func(z), expected)
    assert task.weight == 1.0


def test_a_fresh_scorer_per_task() -> None:
    assert make_task("multiclass", 2).scorer is not make_task("multiclass", 2).scorer


def test_multiclass_loss_is_cross_entropy() -> None:
    model = MultitaskClassifier([make_task("multiclass", 3)])
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    losses, counts = model.calculate_loss({"x": X}, {"t": y})
    assert torch.allclose(losses["t"], F.cross_entropy(outputs(model, X), y))
    assert counts == {"t": 6}


@pytest.mark.parametrize("label_dtype", [torch.long, torch.float32])
def test_binary_loss_is_bce_with_logits_on_one_logit(label_dtype: torch.dtype) -> None:
    model = MultitaskClassifier([make_task("binary", 1)])
    y = torch.tensor([0, 1, 1, 0, 1, 0], dtype=label_dtype)
    losses, _ = model.calculate_loss({"x": X}, {"t": y})
    logits = outputs(model, X)[:, 0]
    assert torch.allclose(losses["t"], F.binary_cross_entropy_with_logits(logits, y.float()))
    probs = model.predict(
        DictDataLoader(DictDataset("d", "valid", {"x": X}, {"t": y}), 6), return_preds=True
    )
    assert probs["probs"]["t"].shape == (6,)  # the trailing 1 is dropped
    assert np.array_equal(probs["preds"]["t"], (probs["probs"]["t"] >= 0.5).astype(int))


def test_binary_threshold_sets_predictions() -> None:
    task = make_task("binary", 1, threshold=0.8)
    preds = task.predictions(torch.tensor([0.7, 0.85, 0.2]))
    assert preds.tolist() == [0, 1, 0]


def test_binary_with_two_logits_is_a_clear_error() -> None:
    model = MultitaskClassifier([make_task("binary", 2)])
    with pytest.raises(
        ValueError, match=r"binary task needs one logit per label.*multiclass"
    ) as info:
        model.calculate_loss({"x": X}, {"t": torch.tensor([0, 1, 1, 0, 1, 0])})
    assert any("task 't'" in note for note in info.value.__notes__)
    assert isinstance(info.value, DataError)  # an MtlGraphError that is also a ValueError


def test_multilabel_loss_masks_single_elements() -> None:
    model = MultitaskClassifier([make_task("multilabel", 3)])
    y = torch.tensor([[1, 0, -1], [0, 1, 1], [-1, -1, -1], [1, 1, 0], [0, -1, 1], [1, 0, 0]])
    losses, counts = model.calculate_loss({"x": X}, {"t": y})
    logits = outputs(model, X)
    active = y != -1
    expected = F.binary_cross_entropy_with_logits(logits[active], y[active].float())
    assert torch.allclose(losses["t"], expected)
    assert counts == {"t": 5}  # the row with no active element is dropped


def test_regression_loss_is_mse_and_masks_nan() -> None:
    model = MultitaskClassifier([make_task("regression", 1)])
    y = torch.tensor([0.5, math.nan, -1.0, 2.0, math.nan, 0.0])
    losses, counts = model.calculate_loss({"x": X}, {"t": y})
    keep = ~torch.isnan(y)
    assert torch.allclose(losses["t"], F.mse_loss(outputs(model, X)[keep, 0], y[keep]))
    assert counts == {"t": 4}


def test_multi_output_regression_masks_elements() -> None:
    model = MultitaskClassifier([make_task("regression", 2)])
    y = torch.tensor(
        [[0.5, math.nan], [1.0, 2.0], [math.nan, math.nan], [0.0, -1.0]] + [[1.0, 1.0]] * 2
    )
    losses, counts = model.calculate_loss({"x": X}, {"t": y})
    active = ~torch.isnan(y)
    assert torch.allclose(losses["t"], F.mse_loss(outputs(model, X)[active], y[active]))
    assert counts == {"t": 5}


def test_multiclass_ignores_minus_one_rows_and_all_ignored_drops_the_task() -> None:
    model = MultitaskClassifier([make_task("multiclass", 3)])
    y = torch.tensor([0, -1, 1, -1, 2, 2])
    losses, counts = model.calculate_loss({"x": X}, {"t": y})
    keep = y != -1
    assert torch.allclose(losses["t"], F.cross_entropy(outputs(model, X)[keep], y[keep]))
    assert counts == {"t": 4}
    assert model.calculate_loss({"x": X}, {"t": torch.full((6,), -1)}) == ({}, {})


def test_custom_ignore_value() -> None:
    model = MultitaskClassifier([make_task("regression", 1, ignore_value=-99.0)])
    y = torch.tensor([0.5, -99.0, -1.0, 2.0, 1.0, 0.0])
    _, counts = model.calculate_loss({"x": X}, {"t": y})
    assert counts == {"t": 5}


# ---------------------------------------------------------------------- explicit arguments win


def test_explicit_loss_output_and_scorer_win_over_the_type() -> None:
    def l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out[:, 0] - y).abs().mean()

    def doubled(out: torch.Tensor) -> torch.Tensor:
        return 2 * out

    scorer = Scorer(metrics=["mae"])
    task = make_task("regression", 1, loss_func=l1, output_func=doubled, scorer=scorer)
    assert task.loss_func is l1 and task.output_func is doubled and task.scorer is scorer
    model = MultitaskClassifier([task])
    y = torch.linspace(0, 1, 6)
    losses, _ = model.calculate_loss({"x": X}, {"t": y})
    assert torch.allclose(losses["t"], (outputs(model, X)[:, 0] - y).abs().mean())


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": -1.0}, "weight must be a finite number >= 0"),
        ({"weight": math.nan}, "weight must be a finite number >= 0"),
        ({"weight": True}, "weight must be a finite number >= 0"),
        ({"threshold": 1.0}, r"threshold must be in \(0, 1\)"),
        ({"loss_func": "mse"}, "loss_func must be callable"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        make_task("multiclass", 2, **kwargs)


def test_unknown_task_type_suggests_the_near_miss() -> None:
    with pytest.raises(
        TaskDefinitionError, match=r"unknown task_type 'regresion' \(did you mean 'regression'\?\)"
    ):
        make_task("regresion", 1)


def test_all_problems_at_once() -> None:
    with pytest.raises(TaskDefinitionError) as info:
        make_task("multi", 2, weight=-2.0, threshold=3.0)
    assert len(info.value.problems) == 3


def test_static_weight_is_kept() -> None:
    assert make_task("binary", 1, weight=2.5).weight == 2.5


# ---------------------------------------------------------------------- metrics through the model


def score(task: Task, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model = MultitaskClassifier([task])
    loader = DictDataLoader(DictDataset("d", "valid", {"x": x}, {task.name: y}), batch_size=4)
    return model.score(loader), model.predict(loader, return_preds=True)  # type: ignore[return-value]


def test_regression_metrics_equal_sklearn_on_unmasked_rows() -> None:
    y = torch.tensor([0.5, math.nan, -1.0, 2.0, 1.0, 0.0])
    scores, result = score(make_task("regression", 1), X, y)
    keep = ~np.isnan(y.numpy())
    golds, preds = y.numpy()[keep].astype(float), result["preds"]["t"][keep].astype(float)
    assert scores["t/d/valid/mse"] == pytest.approx(skm.mean_squared_error(golds, preds))
    assert scores["t/d/valid/mae"] == pytest.approx(skm.mean_absolute_error(golds, preds))
    assert scores["t/d/valid/r2"] == pytest.approx(skm.r2_score(golds, preds))


def test_binary_accuracy_equals_sklearn_on_unmasked_rows() -> None:
    y = torch.tensor([0, 1, -1, 1, 0, -1])
    scores, result = score(make_task("binary", 1), X, y)
    keep = y.numpy() != -1
    expected = skm.accuracy_score(y.numpy()[keep], result["preds"]["t"][keep])
    assert scores["t/d/valid/accuracy"] == pytest.approx(expected)


def test_multilabel_accuracy_is_per_element_with_or_without_masking() -> None:
    full = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    task = make_task("multilabel", 3)
    scores, result = score(task, X, full)
    preds = result["preds"]["t"]
    assert scores["t/d/valid/accuracy"] == pytest.approx(
        skm.accuracy_score(full.numpy().reshape(-1), preds.reshape(-1))
    )
    masked = full.clone()
    masked[0, 2] = masked[3, 0] = -1
    scores, _ = score(task, X, masked)
    active = masked.numpy() != -1
    assert scores["t/d/valid/accuracy"] == pytest.approx(
        skm.accuracy_score(masked.numpy()[active], preds[active])
    )


def test_multilabel_f1_is_micro_with_or_without_masking() -> None:
    golds = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]])
    preds = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]])
    scorer = Scorer(["f1"])
    unmasked = scorer.score(golds, preds, preds.astype(float))["f1"]
    assert unmasked == pytest.approx(skm.f1_score(golds.reshape(-1), preds.reshape(-1)))
    masked_golds = golds.copy()
    masked_golds[0, 1] = -1  # a true negative predicted negative: micro f1 unchanged
    assert scorer.score(masked_golds, preds, preds.astype(float))["f1"] == pytest.approx(unmasked)


# ---------------------------------------------------------------------- every type trains


def test_every_task_type_learns_on_a_shared_trunk() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 600
    x = torch.randn(n, 3, generator=g)
    labels = {
        "mc": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(),  # 3 classes
        "bin": (x[:, 2] > 0).long(),
        "ml": torch.stack([x[:, 0] > 0, x[:, 1] > 0.5, x[:, 2] < 0], dim=1).long(),
        "reg": x[:, 0] - 2 * x[:, 1],
    }
    trunk = nn.Sequential(nn.Linear(3, 32), nn.ReLU())
    dims = {
        "mc": ("multiclass", 3),
        "bin": ("binary", 1),
        "ml": ("multilabel", 3),
        "reg": ("regression", 1),
    }
    tasks = [
        Task(
            name,
            {"trunk": trunk, f"{name}_head": nn.Linear(32, out)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{name}_head", ["trunk"])],
            task_type=task_type,  # type: ignore[arg-type]
        )
        for name, (task_type, out) in dims.items()
    ]
    model = MultitaskClassifier(tasks)
    loaders = [
        DictDataLoader(
            DictDataset("d", split, {"x": x[rows]}, {t: y[rows] for t, y in labels.items()}),
            batch_size=32,
            shuffle=split == "train",
        )
        for split, rows in (("train", slice(0, 500)), ("valid", slice(500, n)))
    ]
    trainer = Trainer(n_epochs=15, lr=0.01, progress_bar=False)
    trainer.fit(model, loaders)
    record = trainer.history[-1]
    assert record["mc/d/valid/accuracy"] > 0.9
    assert record["bin/d/valid/accuracy"] > 0.95
    assert record["ml/d/valid/accuracy"] > 0.9
    assert record["reg/d/valid/r2"] > 0.95
