"""LR schedules counted in epochs or in optimizer steps, with a floor: pure functions of the
step counters, so a resumed run gets the same factors."""

from __future__ import annotations

import pytest

from mtlgraph.training.lr import LR_SCHEDULES, lr_factor_fn


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "exponential", "gamma": 0.5, "unit": "steps"}, [1, 0.5, 0.25, 0.125, 0.0625]),
        ({"name": "step", "gamma": 0.5, "step_size": 2, "unit": "steps"}, [1, 1, 0.5, 0.5, 0.25]),
        ({"name": "exponential", "gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25]),  # epochs of 2 steps
        ({"name": "step", "gamma": 0.1, "step_size": 2}, [1, 1, 1, 1, 0.1]),
    ],
)
def test_exponential_and_step_count_epochs_or_steps(
    spec: dict[str, object], expected: list[float]
) -> None:
    f = lr_factor_fn(spec, 0, 10)
    assert f is not None
    assert [f(s, s // 2) for s in range(5)] == pytest.approx(expected)


def test_steps_are_counted_after_the_warmup_and_min_factor_is_a_floor() -> None:
    f = lr_factor_fn(
        {"name": "exponential", "gamma": 0.5, "unit": "steps", "min_factor": 0.3}, 2, 10
    )
    assert f is not None
    assert [f(s, 0) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.3, 0.3])
    linear = lr_factor_fn({"name": "linear", "min_factor": 0.25}, 0, 4)
    assert linear is not None
    assert [linear(s, 0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [linear(s, 0) for s in (3, 0, 2)] == pytest.approx([0.25, 1.0, 0.5])  # any order


def test_schedule_arguments_are_checked() -> None:
    assert LR_SCHEDULES.problems({"name": "step", "unit": "batches"}, "lr_scheduler") == [
        "lr_scheduler.unit: expected one of 'epochs', 'steps', got the string 'batches'"
    ]
    assert LR_SCHEDULES.problems({"name": "exponential", "steps": 3}, "lr_scheduler") == [
        "lr_scheduler.steps: LR schedule 'exponential' gets 'steps' from mtlgraph; remove it"
    ]
