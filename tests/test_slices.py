"""Slice scoring: keys ``task/<dataset>:<slice>/split/metric``, NaN for empty slices, bad slice
functions, the Trainer's registered slices, and YAML through ``imports:``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_loader, make_task
from experiment_helpers import tiny_config, write_config
from sklearn.metrics import accuracy_score
from torch import nn

from mtlgraph import ConfigError, DataError, DictDataset, MultitaskClassifier, Trainer
from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config
from mtlgraph.graph.slices import SLICES


def _model_and_loader() -> tuple[MultitaskClassifier, object, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MultitaskClassifier([make_task("t", nn.Sequential(nn.Linear(2, 4), nn.ReLU()))])
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    return model, make_loader("pts", "valid", {"x": x}, {"t": y}, 16), x, y


def test_slice_scores_match_sklearn_on_the_slice_and_empty_slices_are_nan() -> None:
    model, loader, x, y = _model_and_loader()
    scores = model.score(
        loader, slices={"right": lambda X: X["x"][:, 1] > 0, "none": lambda X: X["x"][:, 0] > 9}
    )
    assert sorted(scores) == [
        "t/pts/valid/accuracy",
        "t/pts:none/valid/accuracy",
        "t/pts:right/valid/accuracy",
    ]
    preds = model.predict(loader, return_preds=True)["preds"]["t"]
    mask = (x[:, 1] > 0).numpy()
    assert scores["t/pts:right/valid/accuracy"] == pytest.approx(
        accuracy_score(y.numpy()[mask], preds[mask])
    )
    assert scores["t/pts/valid/accuracy"] == pytest.approx(accuracy_score(y.numpy(), preds))
    assert math.isnan(scores["t/pts:none/valid/accuracy"])
    result = model.predict(loader, slices={"right": lambda X: X["x"][:, 1] > 0})
    assert result["slice:right"]["t"].tolist() == mask.tolist()


def test_bad_slice_functions_and_names_are_named() -> None:
    model, loader, _, _ = _model_and_loader()
    with pytest.raises(DataError, match=r"slice function 'f' on dataset 'pts' \(valid\) returned "):
        model.score(loader, slices={"f": lambda X: X["x"][:, 0]})
    with pytest.raises(DataError, match=r"returned shape \(3,\) for a batch of 16 rows"):
        model.score(loader, slices={"f": lambda X: X["x"][:3, 0] > 0})
    with pytest.raises(ConfigError, match="slice name 'a:b' must not contain ':'"):
        model.score(loader, slices={"a:b": lambda X: X["x"][:, 0] > 0})
    with pytest.raises(ConfigError, match="unknown slice function 'nope'"):
        model.score(loader, slices=["nope"])
    with pytest.raises(DataError, match=r"dataset name 'a:b' must not contain ':'"):
        DictDataset("a:b", "train", {"x": torch.zeros(2, 1)}, {})

    def boom(X: dict) -> torch.Tensor:
        raise KeyError("xx")

    with pytest.raises(KeyError) as info:
        model.score(loader, slices={"boom": boom})
    assert "raised by slice function 'boom' on dataset 'pts' (valid)" in str(info.value.__notes__)


def test_trainer_logs_registered_slices_at_evaluation() -> None:
    model, loader, x, y = _model_and_loader()
    train = make_loader("pts", "train", {"x": x}, {"t": y}, 16)

    def upper(X: dict) -> torch.Tensor:
        return X["x"][:, 1] > 0

    SLICES.register("upper_test", upper)
    try:
        with pytest.raises(ConfigError, match=r"slices: unknown slice function 'uper_test' \(did"):
            Trainer(slices=["uper_test"])
        trainer = Trainer(n_epochs=2, slices=["upper_test"], progress_bar=False)
        trainer.fit(model, [train, loader])
    finally:
        SLICES.unregister("upper_test")
    assert "t/pts:upper_test/valid/accuracy" in trainer.history[-1]
    assert "t/pts/valid/accuracy" in trainer.history[-1]


def test_a_bad_registered_slice_fails_before_any_training_step() -> None:
    model, loader, x, y = _model_and_loader()
    train = make_loader("pts", "train", {"x": x}, {"t": y}, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SLICES.register("scores_test", lambda X: X["x"][:, 1])  # floats, not booleans
    try:
        with pytest.raises(DataError, match="slice function 'scores_test' on dataset 'pts'"):
            Trainer(n_epochs=1, slices=["scores_test"], progress_bar=False).fit(
                model, [train, loader]
            )
    finally:
        SLICES.unregister("scores_test")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_loaders_with_one_name_and_split_for_different_tasks_train() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    ya, yb = (x[:, 0] > 0).long(), (x[:, 1] > 0).long()
    loaders = [
        make_loader("d", "train", {"x": x}, {"a": ya}),
        make_loader("d", "train", {"x": x}, {"b": yb}),
        make_loader("d", "valid", {"x": x}, {"a": ya}),
        make_loader("d", "valid", {"x": x}, {"b": yb}),
    ]
    trainer = Trainer(n_epochs=1, progress_bar=False)
    trainer.fit(model, loaders)
    assert {"a/d/valid/accuracy", "b/d/valid/accuracy"} <= set(trainer.history[-1])
    with pytest.raises(DataError, match=r"both label task 'a'; their score keys 'a/d/train/...'"):
        trainer.fit(model, [*loaders, make_loader("d", "train", {"x": x}, {"a": ya})])


def test_yaml_slices_through_imports(tmp_path: Path) -> None:
    (tmp_path / "my_slices_i15.py").write_text(
        "from mtlgraph.graph.slices import SLICES\n"
        "SLICES.register('near_origin', lambda X: X['xy'].norm(dim=1) < 0.5)\n"
    )
    cfg = tiny_config(n_epochs=1, slices=["near_origin"])
    cfg["imports"] = ["my_slices_i15"]
    try:
        exp = build_experiment(load_config(write_config(tmp_path / "c.yaml", cfg)))
        exp.trainer.fit(exp.model, exp.loaders)
    finally:
        SLICES.unregister("near_origin")
        sys.modules.pop("my_slices_i15", None)
    final = exp.trainer.history[-1]
    assert "circle_task/circles:near_origin/valid/accuracy" in final
    assert "square_task/squares:near_origin/valid/accuracy" in final
