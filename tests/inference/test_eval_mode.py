"""One ``eval_mode``: every submodule evaluates, then gets its own training flag back."""

from __future__ import annotations

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import MultitaskClassifier
from mtlgraph.inference import eval_mode


class _Told(nn.Module):
    """Records every ``train(mode)`` call (a module that overrides ``train``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def train(self, mode: bool = True) -> _Told:
        self.calls.append(mode)
        return super().train(mode)


def test_eval_mode_restores_each_submodule_even_when_the_body_raises() -> None:
    frozen, told = nn.BatchNorm1d(4), _Told()
    model = nn.Sequential(nn.Linear(2, 4), frozen, nn.Sequential(nn.Dropout(), told))
    frozen.eval()  # the user froze it: it stays in eval after
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True, True, True]
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
    assert told.calls == [False, True]  # told on the way in and out


def test_predict_leaves_a_frozen_module_in_eval_and_the_rest_training() -> None:
    trunk = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    model = MultitaskClassifier([make_task("a", trunk)])
    trunk[1].eval()
    loader = make_loader("d", "test", {"x": torch.randn(6, 2)}, {"a": torch.zeros(6).long()})
    model.predict(loader)
    assert model.training and trunk[0].training and not trunk[1].training


def test_eval_mode_of_some_modules_leaves_the_others_alone() -> None:
    run, other, shared = nn.Dropout(), nn.Dropout(), nn.Dropout()
    model = nn.ModuleDict({"run": nn.Sequential(run, shared), "other": nn.Sequential(other)})
    with eval_mode(model, [model["run"], shared]):  # shared twice: switched and restored once
        assert [run.training, shared.training, other.training] == [False, False, True]
    assert all(m.training for m in model.modules())


def test_head_widths_switch_only_the_modules_the_plan_runs() -> None:
    from mtlgraph.inference import head_widths

    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    elsewhere = _Told()
    model = MultitaskClassifier(
        [make_task("a", trunk), make_task("b", nn.Sequential(elsewhere), trunk_name="b_trunk")]
    )
    assert head_widths(model, {"x": torch.randn(3, 2)}, ["a"]) == {"a": 2}
    assert elsewhere.calls == [] and model.training
