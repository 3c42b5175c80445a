"""Batch schedulers: plans, seeding, state, registry."""

from __future__ import annotations

from collections import Counter

import pytest

from mtlgraph import BatchScheduler, ConfigError, DataError, MtlGraphError
from mtlgraph.data.schedulers import (
    SCHEDULERS,
    MixedScheduler,
    RoundRobinScheduler,
    SequentialScheduler,
    ShuffledScheduler,
)


def test_sequential() -> None:
    assert SequentialScheduler().epoch_plan([2, 1, 3]) == [(0,), (0,), (1,), (2,), (2,), (2,)]


def test_shuffled_uses_every_batch_once_and_is_seeded() -> None:
    plan = ShuffledScheduler(seed=3).epoch_plan([5, 2, 7])
    assert Counter(s[0] for s in plan) == {0: 5, 1: 2, 2: 7}
    assert plan == ShuffledScheduler(seed=3).epoch_plan([5, 2, 7])
    assert plan != ShuffledScheduler(seed=4).epoch_plan([5, 2, 7])


def test_shuffled_state_round_trip_reproduces_the_next_epoch() -> None:
    a = ShuffledScheduler(seed=1)
    a.epoch_plan([4, 4])
    state = a.state_dict()
    expected = a.epoch_plan([4, 4])
    b = ShuffledScheduler(seed=99)
    b.load_state_dict(state)
    assert b.epoch_plan([4, 4]) == expected


def test_round_robin_alternates_until_all_exhausted() -> None:
    assert RoundRobinScheduler().epoch_plan([3, 1, 2]) == [(0,), (1,), (2,), (0,), (2,), (0,)]


def test_mixed_puts_every_loader_in_each_step() -> None:
    assert MixedScheduler().epoch_plan([3, 1]) == [(0, 1)] * 3


def test_custom_scheduler_one_method_and_registry() -> None:
    class Reverse(BatchScheduler):
        def schedule(self, batch_counts):  # type: ignore[no-untyped-def]
            return [i for i in reversed(range(len(batch_counts))) for _ in range(batch_counts[i])]

    SCHEDULERS.register("reverse_test", Reverse)
    try:
        assert "reverse_test" in SCHEDULERS.names()
        assert SCHEDULERS.build("reverse_test", seed=0).epoch_plan([1, 2]) == [(1,), (1,), (0,)]
        SCHEDULERS.register("reverse_test", Reverse)  # the same class again: a no-op
        with pytest.raises(ConfigError, match="already registered"):
            SCHEDULERS.register("reverse_test", SequentialScheduler)
    finally:
        SCHEDULERS.unregister("reverse_test")
    assert "reverse_test" not in SCHEDULERS.names()
    with pytest.raises(ConfigError, match="must be a BatchScheduler subclass"):
        SCHEDULERS.register("x", int)  # type: ignore[arg-type]


def test_make_scheduler_forms_and_errors() -> None:
    inst = ShuffledScheduler(seed=5)
    assert SCHEDULERS.build(inst, seed=0) is inst
    assert SCHEDULERS.build({"name": "shuffled", "seed": 7}, seed=0).seed == 7
    assert SCHEDULERS.build("shuffled", seed=11).seed == 11
    with pytest.raises(
        ConfigError, match="unknown batch scheduler 'shufled' \\(did you mean 'shuffled'\\?\\)"
    ):
        SCHEDULERS.build("shufled", seed=0)


def test_scheduler_kwargs_are_checked_before_it_is_built() -> None:
    class Tempered(BatchScheduler):
        def __init__(self, temperature: float, seed: int = 0) -> None:
            super().__init__(seed)
            self.temperature = temperature

        def schedule(self, batch_counts):  # type: ignore[no-untyped-def]
            return [0]

    SCHEDULERS.register("tempered_test", Tempered)
    try:
        with pytest.raises(
            ConfigError,
            match="batch scheduler 'tempered_test' takes no argument 'tempreature' "
            "\\(did you mean 'temperature'\\?\\)",
        ) as info:
            SCHEDULERS.build({"name": "tempered_test", "tempreature": 2}, seed=0)
        assert isinstance(info.value, MtlGraphError)
        assert "temperature: missing (required by batch scheduler" in str(info.value)
        assert SCHEDULERS.build({"name": "tempered_test", "temperature": 2}, seed=3).seed == 3
    finally:
        SCHEDULERS.unregister("tempered_test")
    assert SCHEDULERS.problems({"name": "mixed", "tempreature": 2}, "batch_scheduler") == [
        "batch_scheduler.tempreature: batch scheduler 'mixed' takes no argument 'tempreature'; "
        "it takes 'seed'"
    ]
    assert SCHEDULERS.problems({"name": "weighted", "weights": [1, 2]}, "batch_scheduler") == [
        "batch_scheduler.weights: expected a mapping, got list [1, 2]"
    ]
    assert SCHEDULERS.problems(MixedScheduler()) == []
    assert SCHEDULERS.problems("mixed") == []


def test_out_of_range_steps_are_rejected() -> None:
    class Bad(BatchScheduler):
        def schedule(self, batch_counts):  # type: ignore[no-untyped-def]
            return [5]

    with pytest.raises(DataError, match="loader indices must be in 0..1"):
        Bad().epoch_plan([1, 1])
