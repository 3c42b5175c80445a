"""Snorkel 0.10 model files load through compat ``model.load`` and predict as Snorkel would.

The files are built the way Snorkel's ``MultitaskClassifier.save`` writes them:
``torch.save(model.state_dict())`` of a module whose ``module_pool`` is an ``nn.ModuleDict``,
each module wrapped in ``nn.DataParallel`` by default (keys ``module_pool.<name>.module.*``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlgraph
from mtlgraph import CheckpointError
from mtlgraph.compat.snorkel import MultitaskClassifier, Operation, Task

from .conftest import loaders, snorkel_model


def snorkel_file(path: Path, dataparallel: bool, seed: int = 7) -> dict[str, torch.Tensor]:
    """Write a Snorkel-shaped model file of the conftest task; return its weights by role."""
    torch.manual_seed(seed)
    base, head = nn.Sequential(nn.Linear(2, 4), nn.ReLU()), nn.Linear(4, 2)
    holder = nn.Module()
    wrap = nn.DataParallel if dataparallel else (lambda m: m)
    holder.module_pool = nn.ModuleDict({"base": wrap(base), "t_head": wrap(head)})
    torch.save(holder.state_dict(), path)
    return {"w1": base[0].weight, "b1": base[0].bias, "w2": head.weight, "b2": head.bias}


@pytest.mark.parametrize("dataparallel", [True, False])
def test_a_snorkel_model_file_loads_and_predicts_as_in_snorkel(
    tmp_path: Path, dataparallel: bool
) -> None:
    path = tmp_path / "best_model.pth"
    w = snorkel_file(path, dataparallel)
    raw = torch.load(path, weights_only=True)
    assert ("module_pool.base.module.0.weight" in raw) is dataparallel
    model = snorkel_model(seed=0)
    model.load(path)
    loader = loaders()[1]
    x = loader.dataset.X_dict["x"]
    with torch.no_grad():  # Snorkel's forward by hand: softmax(head(relu(lin(x))))
        expected = F.softmax(F.relu(x @ w["w1"].T + w["b1"]) @ w["w2"].T + w["b2"], dim=1)
    result = model.predict(loader, return_preds=True)
    assert np.allclose(result["probs"]["t"], expected.numpy(), atol=1e-6)
    assert np.array_equal(result["preds"]["t"], expected.argmax(1).numpy())


def test_a_snorkel_file_of_another_model_is_refused_with_every_difference(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.pth"
    snorkel_file(path, dataparallel=True)
    other = snorkel_model(name="u", head="u_head")
    with pytest.raises(CheckpointError) as info:
        other.load(path)
    message = str(info.value)
    assert "missing 'module_pool.u_head.weight', 'module_pool.u_head.bias'" in message
    assert "unexpected 'module_pool.t_head.module.weight'" in message
    before = other.module_pool["base"][0].weight.clone()
    assert torch.equal(other.module_pool["base"][0].weight, before)  # nothing was loaded
    torch.save({"model": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="neither an mtlgraph model file nor a Snorkel"):
        other.load(tmp_path / "junk.pt")


def test_a_file_saved_under_other_task_names_loads_when_the_modules_match(
    tmp_path: Path,
) -> None:
    saved = snorkel_model(seed=1, name="a", head="head")
    saved.save(tmp_path / "a.pt")
    renamed = snorkel_model(seed=2, name="b", head="head")  # same module names, task 'b'
    renamed.load(tmp_path / "a.pt")
    for p, q in zip(saved.parameters(), renamed.parameters(), strict=True):
        assert torch.equal(p, q)
    core = mtlgraph.MultitaskClassifier(list(renamed.tasks.values()))
    with pytest.raises(CheckpointError, match="weights of tasks \\['a'\\]"):  # core: strict
        core.load(tmp_path / "a.pt")


class Combiner(nn.Module):
    """A module with weights that reads the whole outputs dict (``inputs=[]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(outputs["base"])


def test_a_whole_outputs_module_loads_from_either_layout(tmp_path: Path) -> None:
    def model() -> MultitaskClassifier:
        pool = nn.ModuleDict({"base": nn.Linear(2, 4), "comb": Combiner()})
        ops = [Operation("base", [("_input_", "x")]), Operation("comb", [])]
        return MultitaskClassifier([Task("t", pool, ops)], device=-1)

    torch.manual_seed(3)
    plain = nn.Module()  # Snorkel with dataparallel=False: module_pool.comb.linear.weight
    plain.module_pool = nn.ModuleDict({"base": nn.Linear(2, 4), "comb": Combiner()})
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    ours = model()
    ours.load(tmp_path / "plain.pth")
    assert torch.equal(
        ours.module_pool["comb"].module.linear.weight, plain.module_pool["comb"].linear.weight
    )
    ours.save(tmp_path / "ours.pt")
    again = model()
    again.load(tmp_path / "ours.pt")
    x = torch.randn(3, 2)
    assert torch.equal(
        again.forward({"x": x}, ["t"])["comb"], ours.forward({"x": x}, ["t"])["comb"]
    )
