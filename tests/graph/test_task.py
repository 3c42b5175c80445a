"""Operation and Task: construction, defaults, and validation messages."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph import Input, Operation, Scorer, Task, TaskDefinitionError, detach


def test_operation_defaults_and_input_forms() -> None:
    op = Operation("base_mlp", [("_input_", "circle_data"), "prev", ("enc", 0), detach("a")])
    assert op.name == "base_mlp"
    assert [i.source for i in op.inputs] == ["_input_", "prev", "enc", "a"]
    assert [i.key for i in op.inputs] == ["circle_data", None, 0, None]
    assert [i.detach for i in op.inputs] == [False, False, False, True]
    named = Operation(name="circle_head", module_name="head", inputs=["base_mlp"])
    assert (named.name, named.module_name) == ("circle_head", "head")
    assert Operation("m", ["_input_"]) == Operation("m", [Input("_input_")])


def test_operation_reports_every_problem() -> None:
    with pytest.raises(TaskDefinitionError) as info:
        Operation("", "_input_", name="a/b")
    msg = str(info.value)
    assert "module_name '' must be a non-empty string" in msg
    assert "must not contain '/'" in msg
    assert "must be a list" in msg and "write ['_input_']" in msg
    assert len(info.value.problems) == 3


def test_operation_rejects_bad_inputs() -> None:
    with pytest.raises(TaskDefinitionError, match=r"input \('a', 1.5\) must be an op name"):
        Operation("m", [("a", 1.5)])
    with pytest.raises(TaskDefinitionError, match="has no inputs"):
        Operation("m", [])
    with pytest.raises(TaskDefinitionError, match="reserved for the input dictionary"):
        Operation("_input_", ["x"])


def _pool() -> nn.ModuleDict:
    return nn.ModuleDict({"base_mlp": nn.Linear(2, 4), "head": nn.Linear(4, 2)})


def test_task_defaults_follow_the_tutorial() -> None:
    task = Task(
        "circle_task",
        _pool(),
        [Operation("base_mlp", [("_input_", "x")]), Operation("head", ["base_mlp"])],
    )
    assert task.output_op == "head"
    assert task.scorer.metric_keys == ["accuracy"]
    assert task.ignore_value == -1 and task.weight == 1.0
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 1])
    assert torch.allclose(task.loss_func(logits, target), F.cross_entropy(logits, target))
    assert torch.allclose(task.output_func(logits), F.softmax(logits, dim=1))


def test_each_task_gets_a_fresh_scorer() -> None:
    ops = [Operation("base_mlp", [("_input_", "x")])]
    a, b = Task("a", _pool(), ops), Task("b", _pool(), ops)
    assert a.scorer is not b.scorer


def test_explicit_functions_win_over_defaults() -> None:
    scorer = Scorer(metrics=["f1"])
    loss = partial(F.cross_entropy, label_smoothing=0.1)
    task = Task(
        "t",
        _pool(),
        [Operation("base_mlp", ["_input_"])],
        loss_func=loss,
        output_func=torch.sigmoid,
        scorer=scorer,
        task_type="regression",
    )
    assert task.loss_func is loss and task.output_func is torch.sigmoid and task.scorer is scorer
    assert math.isnan(task.ignore_value)  # type: ignore[arg-type]


def test_task_reports_every_problem_with_suggestions() -> None:
    with pytest.raises(TaskDefinitionError) as info:
        Task(
            "circle/task",
            _pool(),
            [
                Operation("base_mpl", [("_input_", "x")]),
                Operation("head", ["base_mlp"]),
                Operation("head", ["later"]),
                Operation("base_mlp", ["head"], name="later"),
            ],
            task_type="multiclas",
            weight=-1,
        )
    problems = info.value.problems
    text = "\n".join(problems)
    assert "task name 'circle/task' must be a non-empty string without '/'" in text
    assert "unknown module 'base_mpl' in operation 'base_mpl' (did you mean 'base_mlp'?)" in text
    assert "operation 'head' reads 'base_mlp', which names no earlier operation" in text
    assert "duplicate operation name 'head'" in text
    assert "operation 'head' reads 'later', which runs later; reorder the operations" in text
    assert "unknown task_type 'multiclas' (did you mean 'multiclass'?)" in text
    assert "weight must be a finite number >= 0" in text
    assert len(problems) == 6 + 1


def test_task_rejects_empty_sequence_and_bad_pool() -> None:
    with pytest.raises(TaskDefinitionError, match="op_sequence is empty"):
        Task("t", _pool(), [])
    with pytest.raises(TaskDefinitionError, match="module 'f' is a function, not an nn.Module"):
        Task("t", {"f": lambda x: x}, [Operation("f", ["_input_"])])  # type: ignore[dict-item]
    with pytest.raises(TaskDefinitionError, match="reads its own output"):
        Task("t", _pool(), [Operation("head", ["head"])])


def test_task_types_set_defaults() -> None:
    ops = [Operation("base_mlp", ["_input_"])]
    reg = Task("r", _pool(), ops, task_type="regression")
    assert reg.scorer.metric_keys == ["mse", "mae", "r2"]
    out = torch.tensor([[1.0], [2.0]])
    assert reg.loss_func(out, torch.tensor([1.0, 4.0])).item() == pytest.approx(2.0)
    assert reg.output_func(out).shape == (2,)
    binary = Task("b", _pool(), ops, task_type="binary")
    p = binary.output_func(torch.tensor([[0.0], [10.0]]))
    assert p.shape == (2,) and binary.predictions(p).tolist() == [1, 1]
    ml = Task("m", _pool(), ops, task_type="multilabel")
    logits = torch.tensor([[5.0, -5.0], [0.0, 0.0]])
    target = torch.tensor([[1, -1], [-1, 0]])
    expected = F.binary_cross_entropy_with_logits(
        torch.tensor([5.0, 0.0]), torch.tensor([1.0, 0.0])
    )
    assert ml.loss_func(logits, target).item() == pytest.approx(expected.item())
