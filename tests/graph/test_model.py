"""MultitaskClassifier: merging by name, execution, masking, prediction, scoring, persistence."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_loader, make_task
from sklearn.metrics import accuracy_score
from torch import nn

from mtlgraph import (
    CheckpointError,
    DataError,
    GraphError,
    MultitaskClassifier,
    Operation,
    Task,
    detach,
)


class Counting(nn.Module):
    """A linear layer that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_same_name_shares_weights_and_runs_once() -> None:
    trunk = Counting()
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    assert sorted(model.module_pool) == ["a_head", "b_head", "trunk"]
    out = model.forward({"x": torch.randn(3, 2)}, ["a", "b"])
    assert trunk.calls == 1
    assert sorted(out) == ["a_head", "b_head", "trunk"]
    assert torch.equal(out["a_head"], model.module_pool["a_head"](out["trunk"]))


def test_only_the_requested_tasks_ops_run() -> None:
    trunk = Counting()
    other = Counting()
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", other, trunk_name="t2")])
    model.forward({"x": torch.randn(3, 2)}, ["a"])
    assert (trunk.calls, other.calls) == (1, 0)


def test_same_op_name_on_different_inputs_is_two_nodes() -> None:
    trunk = Counting()
    model = MultitaskClassifier(
        [make_task("a", trunk, field="xa"), make_task("b", trunk, field="xb")]
    )
    X = {"xa": torch.randn(3, 2), "xb": torch.randn(3, 2)}
    out = model.forward(X, ["a", "b"])
    assert trunk.calls == 2
    assert sorted(out) == ["a/trunk", "a_head", "b/trunk", "b_head"]
    assert torch.equal(out["a/trunk"], trunk.linear(X["xa"]))


def test_different_objects_under_one_name_is_an_error_naming_both_tasks() -> None:
    with pytest.raises(
        GraphError, match="'trunk' is bound to different module objects in tasks 'a' and 'b'"
    ):
        MultitaskClassifier([make_task("a", nn.Linear(2, 4)), make_task("b", nn.Linear(2, 4))])


def test_construction_reports_every_problem() -> None:
    trunk = nn.Linear(2, 4)
    with pytest.raises(GraphError) as info:
        MultitaskClassifier(
            [make_task("a", trunk), make_task("a", trunk), make_task("c", nn.Linear(2, 4))]
        )
    assert len(info.value.problems) == 2
    text = str(info.value)
    assert text.startswith("cannot build the model:")
    assert "task name 'a' is used twice" in text
    assert "'trunk' is bound to different module objects in tasks 'a' and 'c'" in text


def test_module_exception_keeps_type_and_traceback_with_context() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ZeroDivisionError("user bug")

    model = MultitaskClassifier([make_task("a", nn.Linear(2, 4), head=Broken())])
    with pytest.raises(ZeroDivisionError, match="user bug") as info:
        model.forward({"x": torch.randn(2, 2)}, ["a"])
    assert info.value.__notes__ == [
        "mtlgraph: raised by operation 'a_head' (module 'a_head') of task 'a'"
    ]
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "forward" and "raise ZeroDivisionError" in (frames[-1].line or "")


def test_missing_input_field_names_op_task_and_fields() -> None:
    model = MultitaskClassifier([make_task("a", nn.Linear(2, 4), field="circle_data")])
    with pytest.raises(
        DataError,
        match=r"reads \['circle_data'\] from the batch's X_dict.*did you mean 'circle_dat'.*fields 'circle_dat'",
    ):
        model.forward({"circle_dat": torch.randn(2, 2)}, ["a"])


def test_add_and_remove_prunes_unused_modules() -> None:
    trunk = nn.Linear(2, 4)
    model = MultitaskClassifier([make_task("a", trunk)])
    model.add_task(make_task("b", trunk))
    assert model.task_names == ["a", "b"] and len(model.module_pool) == 3
    removed = model.remove_task("a")
    assert removed.name == "a"
    assert sorted(model.module_pool) == ["b_head", "trunk"]
    model.remove_task("b")
    assert len(model.module_pool) == 0 and model.task_names == []
    with pytest.raises(GraphError, match="no task 'b' to remove"):
        model.remove_task("b")
    with pytest.raises(GraphError, match="cannot add task 'c'"):
        m2 = MultitaskClassifier([make_task("c", trunk)])
        m2.add_task(make_task("c", trunk))


def test_unknown_task_in_forward_suggests() -> None:
    model = MultitaskClassifier([make_task("circle_task", nn.Linear(2, 4))])
    with pytest.raises(
        GraphError, match="unknown task 'circle_tsk' \\(did you mean 'circle_task'\\?\\)"
    ):
        model.forward({"x": torch.randn(1, 2)}, ["circle_tsk"])


def test_calculate_loss_masks_ignored_labels() -> None:
    torch.manual_seed(0)
    model = MultitaskClassifier(
        [make_task("a", nn.Linear(2, 4)), make_task("b", nn.Linear(2, 4), trunk_name="t2")]
    )
    X = {"x": torch.randn(4, 2)}
    Y = {"a": torch.tensor([0, -1, 1, -1]), "b": torch.tensor([-1, -1, -1, -1])}
    losses, counts = model.calculate_loss(X, Y)
    assert list(losses) == ["a"] and counts == {"a": 2}
    logits = model.forward(X, ["a"])["a_head"]
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))
    assert torch.allclose(losses["a"], expected)


def test_calculate_loss_rejects_unknown_labels() -> None:
    model = MultitaskClassifier([make_task("circle_task", nn.Linear(2, 4))])
    with pytest.raises(
        GraphError,
        match="label 'circle' names no task.*did you mean 'circle_task'.*Remove 'circle' from "
        "the batch's Y_dict",
    ) as info:
        model.calculate_loss({"x": torch.randn(1, 2)}, {"circle": torch.tensor([0])})
    assert "remap_labels" not in str(info.value)  # calculate_loss takes no remap_labels


def test_stop_gradient_edge_blocks_gradient() -> None:
    torch.manual_seed(0)
    a_head, b_head = nn.Linear(4, 1), nn.Linear(1, 2)

    def build(detached: bool) -> MultitaskClassifier:
        trunk = nn.Linear(2, 4)
        a = Task(
            "a",
            {"trunk": trunk, "a_head": a_head},
            [Operation("trunk", [("_input_", "x")]), Operation("a_head", ["trunk"])],
            task_type="regression",
        )
        feed = detach("a_head") if detached else "a_head"
        b = Task(
            "b",
            {"trunk": trunk, "a_head": a_head, "b_head": b_head},
            [
                Operation("trunk", [("_input_", "x")]),
                Operation("a_head", ["trunk"]),
                Operation("b_head", [feed]),
            ],
        )
        return MultitaskClassifier([a, b])

    for detached in (True, False):
        model = build(detached)
        model.zero_grad()
        losses, _ = model.calculate_loss(
            {"x": torch.randn(5, 2)}, {"b": torch.tensor([0, 1, 0, 1, 1])}
        )
        losses["b"].backward()
        got = a_head.weight.grad
        if detached:
            assert got is None and model.module_pool["trunk"].weight.grad is None
        else:
            assert got is not None and got.abs().sum() > 0


def _two_task_model() -> MultitaskClassifier:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    return MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])


def test_predict_returns_numpy_per_task_and_restores_mode() -> None:
    model = _two_task_model()
    X = torch.randn(10, 2)
    loader = make_loader("d", "valid", {"x": X}, {"a": torch.randint(0, 2, (10,))}, batch_size=4)
    model.train()
    res = model.predict(loader, return_preds=True)
    assert model.training
    assert set(res) == {"golds", "probs", "preds"} and set(res["probs"]) == {"a"}
    probs = res["probs"]["a"]
    assert isinstance(probs, np.ndarray) and probs.shape == (10, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(res["preds"]["a"], probs.argmax(1))
    assert "preds" not in model.predict(loader)


def test_score_keys_and_values_match_sklearn_with_masking() -> None:
    model = _two_task_model()
    X = torch.randn(12, 2)
    Y = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0, 1, 1])
    loader = make_loader("circleDataset", "test", {"x": X}, {"a": Y}, batch_size=5)
    scores = model.score([loader])
    assert list(scores) == ["a/circleDataset/test/accuracy"]
    preds = model.predict(loader, return_preds=True)["preds"]["a"]
    keep = Y.numpy() != -1
    expected = accuracy_score(Y.numpy()[keep], preds[keep])
    assert scores["a/circleDataset/test/accuracy"] == expected
    assert isinstance(scores["a/circleDataset/test/accuracy"], float)


def test_remap_labels_scores_with_another_head() -> None:
    model = _two_task_model()
    X = torch.randn(8, 2)
    Y = torch.randint(0, 2, (8,))
    loader = make_loader("aData", "test", {"x": X}, {"a": Y}, batch_size=8)
    cross = model.score(loader, remap_labels={"a": "b"})
    assert list(cross) == ["b/aData/test/accuracy"]
    b_preds = model.forward({"x": X}, ["b"])["b_head"].argmax(1)
    assert cross["b/aData/test/accuracy"] == accuracy_score(Y.numpy(), b_preds.numpy())
    assert model.score(loader, remap_labels={"a": None}) == {}
    with pytest.raises(GraphError, match="remap_labels maps 'a' to unknown task 'bb'"):
        model.score(loader, remap_labels={"a": "bb"})


def test_remap_two_labels_onto_one_task_is_an_error() -> None:
    model = _two_task_model()
    loader = make_loader(
        "d",
        "test",
        {"x": torch.randn(2, 2)},
        {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 0])},
    )
    with pytest.raises(GraphError, match="labels 'a' and 'b' both map to task 'b'"):
        model.predict(loader, remap_labels={"a": "b"})


def test_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _two_task_model()
    path = tmp_path / "model.pt"
    model.save(path)
    other = _two_task_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load(path)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    raw = torch.load(path, weights_only=True)
    assert raw["task_names"] == ["a", "b"]


def test_load_into_a_grown_model_needs_strict_false(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trunk = nn.Linear(2, 4)
    small = MultitaskClassifier([make_task("a", trunk)])
    small.save(tmp_path / "m.pt")
    trunk2 = nn.Linear(2, 4)
    grown = MultitaskClassifier([make_task("a", trunk2), make_task("c", trunk2)])
    with pytest.raises(
        CheckpointError, match=r"missing 'module_pool.c_head.weight', 'module_pool.c_head.bias'"
    ):
        grown.load(tmp_path / "m.pt")
    grown.load(tmp_path / "m.pt", strict=False)
    assert torch.equal(grown.module_pool["trunk"].weight, trunk.weight)


def test_load_suggests_strict_false_only_when_it_would_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trunk = nn.Linear(2, 4)
    MultitaskClassifier([make_task("a", trunk), make_task("c", trunk)]).save(tmp_path / "ac.pt")
    trunk2 = nn.Linear(2, 4)
    small = MultitaskClassifier([make_task("a", trunk2)])  # lacks the file's task 'c'
    with pytest.raises(CheckpointError, match="build the model with the file's tasks") as info:
        small.load(tmp_path / "ac.pt")
    assert "strict=False" not in str(info.value)
    with pytest.raises(CheckpointError, match="not in the model: 'c'"):
        small.load(tmp_path / "ac.pt", strict=False)
    small.save(tmp_path / "a.pt")  # into a model with more tasks: strict=False does load
    grown = MultitaskClassifier([make_task("a", trunk), make_task("c", trunk)])
    with pytest.raises(CheckpointError, match="pass strict=False to load the part that matches"):
        grown.load(tmp_path / "a.pt")
    grown.load(tmp_path / "a.pt", strict=False)


def test_load_refuses_foreign_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.save({"x": 1}, tmp_path / "f.pt")
    with pytest.raises(
        CheckpointError, match="is not an mtlgraph training checkpoint or model file"
    ):
        _two_task_model().load(tmp_path / "f.pt")


def test_device_argument_accepts_strings_and_devices() -> None:
    trunk = nn.Linear(2, 4)
    assert (
        MultitaskClassifier([make_task("a", trunk)], device=torch.device("cpu")).device.type
        == "cpu"
    )
    assert not any(
        isinstance(m, nn.DataParallel)
        for m in MultitaskClassifier([make_task("b", trunk)]).modules()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_moves_batches() -> None:
    model = MultitaskClassifier([make_task("a", nn.Linear(2, 4))], device="cuda")
    loader = make_loader("d", "test", {"x": torch.randn(4, 2)}, {"a": torch.tensor([0, 1, 0, 1])})
    assert set(model.score(loader)) == {"a/d/test/accuracy"}


def test_plan_is_cached_and_independent_of_model_size() -> None:
    trunk = nn.Linear(2, 4)
    model = MultitaskClassifier([make_task(f"t{i}", trunk) for i in range(50)])
    plan = model.plan(["t3"])
    assert model.plan(["t3"]) is plan
    assert [m for _, m, _ in plan.steps] == [trunk, model.module_pool["t3_head"]]
    assert len(plan.parameters) == 4


def test_predict_named_tasks_on_unlabelled_data() -> None:
    model = _two_task_model()
    X = torch.randn(7, 2)
    unlabelled = make_loader("new", "serve", {"x": X}, {}, batch_size=3)
    res = model.predict(unlabelled, return_preds=True, task_names=["a", "b"])
    assert res["golds"] == {} and set(res["probs"]) == {"a", "b"}
    expected = F.softmax(model.forward({"x": X}, ["b"])["b_head"], dim=1)
    np.testing.assert_allclose(res["probs"]["b"], expected.detach().numpy(), rtol=1e-6)
    assert res["preds"]["a"].shape == (7,)
    labelled = make_loader("d", "test", {"x": X}, {"a": torch.zeros(7, dtype=torch.long)})
    res = model.predict(labelled, task_names=["b"])  # a's labels are ignored
    assert set(res["probs"]) == {"b"} and res["golds"] == {}
    res = model.predict(labelled, task_names=["a", "b"])
    assert set(res["golds"]) == {"a"} and set(res["probs"]) == {"a", "b"}
    with pytest.raises(GraphError, match="unknown task 'c'"):
        model.predict(labelled, task_names=["c"])


class _Pair(nn.Module):
    """Returns a named tuple holding a tensor and a dict of tensors (a structured output)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from collections import namedtuple

        Out = namedtuple("Out", ["logits", "extra"])
        y = self.linear(x)
        return Out(y, {"scaled": 2 * y})


class _LossOnPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, pair: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> torch.Tensor:
        return self.linear(pair[0] + pair[1]["scaled"])


def test_structured_outputs_are_masked_and_detached_with_their_structure() -> None:
    seen: list[object] = []

    def loss(out: object, y: torch.Tensor) -> torch.Tensor:
        seen.append(out)
        assert hasattr(out, "_fields")  # the named tuple survives row selection
        return F.cross_entropy(out[0], y)  # type: ignore[index]

    pair, head = _Pair(), _LossOnPair()
    task = Task("t", {"pair": pair}, [Operation("pair", [("_input_", "x")])], loss_func=loss)
    stop = Task(
        "s",
        {"pair": pair, "head": head},
        [Operation("pair", [("_input_", "x")]), Operation("head", [detach("pair")])],
    )
    model = MultitaskClassifier([task, stop])
    x = torch.randn(4, 2)
    losses, counts = model.calculate_loss(
        {"x": x}, {"t": torch.tensor([0, -1, 1, -1]), "s": torch.tensor([0, 1, 0, 1])}
    )
    assert counts == {"t": 2, "s": 4}
    out = seen[0]
    assert out[0].shape == (2, 2) and out[1]["scaled"].shape == (2, 2)  # type: ignore[index]
    losses["s"].backward()  # through a detached input only: no gradient reaches the trunk
    assert pair.linear.weight.grad is None and head.linear.weight.grad is not None
