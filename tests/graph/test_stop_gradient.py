"""Stop-gradient edges: one task's estimate feeds another task without the second task's
gradient flowing into the first (Taboola's lesson 3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    Input,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
    detach,
)


class Concat(nn.Module):
    """Concatenate inputs along the feature dimension, then a linear layer."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat(xs, dim=1))


def make_model(stop: bool, with_trunk: bool = True) -> MultitaskClassifier:
    """Task ``a`` estimates a value; task ``b`` reads a's estimate (detached or not) and, when
    ``with_trunk``, the trunk features too."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    a_head = nn.Linear(6, 1)
    a = Task(
        "a",
        {"trunk": trunk, "a_head": a_head},
        [Operation("trunk", [("_input_", "x")]), Operation("a_head", ["trunk"])],
        task_type="regression",
    )
    estimate = Input("a_head", detach=True) if stop else "a_head"
    inputs = [estimate, "trunk"] if with_trunk else [estimate]
    b = Task(
        "b",
        {"trunk": trunk, "a_head": a_head, "b_head": Concat(7 if with_trunk else 1, 2)},
        [
            Operation("trunk", [("_input_", "x")]),
            Operation("a_head", ["trunk"]),
            Operation("b_head", inputs),
        ],
    )
    return MultitaskClassifier([a, b])


def data(n: int = 32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return {"x": x}, {"a": x.sum(dim=1), "b": (x[:, 0] > 0).long()}


def grads_from_b(model: MultitaskClassifier) -> dict[str, list[torch.Tensor | None]]:
    X, Y = data()
    losses, _ = model.calculate_loss(X, {"b": Y["b"]})
    losses["b"].backward()
    return {m: [p.grad for p in model.module_pool[m].parameters()] for m in model.module_pool}


def nonzero(grads: list[torch.Tensor | None]) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_detached_input_sends_no_gradient_to_the_first_task() -> None:
    grads = grads_from_b(make_model(stop=True))
    assert not nonzero(grads["a_head"])  # a's own parameters: nothing from b's loss
    assert nonzero(grads["trunk"])  # b still trains the trunk through its other input
    assert nonzero(grads["b_head"])


def test_without_detach_the_gradient_flows() -> None:
    grads = grads_from_b(make_model(stop=False))
    assert nonzero(grads["a_head"])


def test_only_a_detached_input_isolates_the_whole_upstream_path() -> None:
    grads = grads_from_b(make_model(stop=True, with_trunk=False))
    assert not nonzero(grads["a_head"]) and not nonzero(grads["trunk"])
    assert nonzero(grads["b_head"])


def test_the_detached_value_equals_the_estimate() -> None:
    model = make_model(stop=True)
    X, _ = data()
    out = model.forward(X, ["a", "b"])
    assert out["a_head"].requires_grad
    with torch.no_grad():
        expected = model.module_pool["b_head"](out["a_head"], out["trunk"])
    assert torch.allclose(out["b_head"], expected)


@pytest.mark.parametrize(("stop", "moves"), [(True, False), (False, True)])
def test_training_the_second_task_leaves_the_first_alone(stop: bool, moves: bool) -> None:
    model = make_model(stop=stop)
    before = copy.deepcopy(model.module_pool["a_head"].state_dict())
    X, Y = data(64)
    loader = DictDataLoader(DictDataset("d", "train", X, {"b": Y["b"]}), batch_size=16)
    Trainer(n_epochs=2, lr=0.05, progress_bar=False).fit(model, [loader])
    after = model.module_pool["a_head"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before) == moves


def test_detach_with_a_key_detaches_the_selected_output() -> None:
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.linear(x)
            return h[:, :2], h[:, 2:]

    torch.manual_seed(0)
    enc = Split()
    task = Task(
        "b",
        {"enc": enc, "head": Concat(2, 2)},
        [Operation("enc", [("_input_", "x")]), Operation("head", [detach("enc", 0)])],
    )
    model = MultitaskClassifier([task])
    X, Y = data()
    losses, _ = model.calculate_loss(X, {"b": Y["b"]})
    losses["b"].backward()
    assert enc.linear.weight.grad is None
    assert detach("enc", 0) == Input("enc", 0, detach=True)


def test_detached_and_plain_reads_of_one_module_are_separate_graph_nodes() -> None:
    """Two tasks run the same module on the same input, one detached: only the plain one
    carries gradient back."""
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    a = Task(
        "a",
        {"trunk": trunk, "head_a": head_a},
        [Operation("trunk", [("_input_", "x")]), Operation("head_a", ["trunk"])],
        task_type="regression",
    )
    b = Task(
        "b",
        {"trunk": trunk, "head_b": head_b},
        [Operation("trunk", [("_input_", "x")]), Operation("head_b", [detach("trunk")])],
        task_type="regression",
    )
    model = MultitaskClassifier([a, b])
    X, Y = data()
    losses, _ = model.calculate_loss(X, {"b": Y["a"]})
    losses["b"].backward()
    assert trunk.weight.grad is None and head_b.weight.grad is not None
    model.zero_grad(set_to_none=True)
    losses, _ = model.calculate_loss(X, {"a": Y["a"]})
    losses["a"].backward()
    assert trunk.weight.grad is not None
