"""Batch schedulers: plans, seeding, state, registry."""

from __future__ import annotations

from collections import Counter

import pytest

from mtlgraph import BatchScheduler, ConfigError, register_scheduler
from mtlgraph.data.schedulers import (
    MixedScheduler,
    RoundRobinScheduler,
    SequentialScheduler,
    ShuffledScheduler,
    make_scheduler,
    scheduler_names,
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

    register_scheduler("reverse_test", Reverse)
    assert "reverse_test" in scheduler_names()
    assert make_scheduler("reverse_test", seed=0).epoch_plan([1, 2]) == [(1,), (1,), (0,)]
    with pytest.raises(ConfigError, match="already registered"):
        register_scheduler("reverse_test", Reverse)
    with pytest.raises(ConfigError, match="must be a BatchScheduler subclass"):
        register_scheduler("x", int)  # type: ignore[arg-type]


def test_make_scheduler_forms_and_errors() -> None:
    inst = ShuffledScheduler(seed=5)
    assert make_scheduler(inst, seed=0) is inst
    assert make_scheduler({"name": "shuffled", "seed": 7}, seed=0).seed == 7
    assert make_scheduler("shuffled", seed=11).seed == 11
    with pytest.raises(
        ConfigError, match="unknown batch_scheduler 'shufled' \\(did you mean 'shuffled'\\?\\)"
    ):
        make_scheduler("shufled", seed=0)


def test_out_of_range_steps_are_rejected() -> None:
    class Bad(BatchScheduler):
        def schedule(self, batch_counts):  # type: ignore[no-untyped-def]
            return [5]

    with pytest.raises(ValueError, match="loader indices must be in 0..1"):
        Bad().epoch_plan([1, 1])
