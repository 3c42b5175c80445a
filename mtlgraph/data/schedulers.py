"""Batch schedulers: which loader's batch (or batches) each training step uses.

A scheduler turns the number of batches of each training loader into an epoch's plan: a list of
steps, each a tuple of loader indices whose next batch joins that step. Most schedulers put one
batch in a step; ``mixed`` puts one batch of every loader in each step so gradient-based
balancers see several tasks at once.

Schedulers live in the registry :data:`SCHEDULERS`: :func:`register_scheduler` adds one,
``SCHEDULERS.unregister(name)`` removes one. A spec's keyword arguments
(``{"name": "mixed", ...}``) are checked against the class's ``__init__`` when it is built.

Each scheduler owns a seeded ``numpy.random.Generator``; no global random state is used. Its
state is part of a checkpoint, so an interrupted epoch resumes with the same order.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.registry import Registry, must_subclass, split_spec

Step = tuple[int, ...]


class BatchScheduler(ABC):
    """Base class: implement :meth:`schedule`.

    Args:
        seed: Seed of the scheduler's own generator (``self.rng``).

    Example:
        >>> from mtlgraph.data.schedulers import BatchScheduler
        >>> class LargestFirst(BatchScheduler):
        ...     def schedule(self, batch_counts):
        ...         order = sorted(range(len(batch_counts)), key=lambda i: -batch_counts[i])
        ...         return [i for i in order for _ in range(batch_counts[i])]
        >>> LargestFirst().epoch_plan([1, 2])
        [(1,), (1,), (0,)]
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng: np.random.Generator = np.random.Generator(np.random.PCG64(seed))

    @abstractmethod
    def schedule(self, batch_counts: Sequence[int]) -> Iterable[int | Sequence[int]]:
        """Return one epoch's steps: a loader index, or a sequence of indices, per step.

        Args:
            batch_counts: Number of batches of each training loader, in loader order.
        """

    def epoch_plan(self, batch_counts: Sequence[int]) -> list[Step]:
        """Call :meth:`schedule` and normalise/validate its result into a list of steps."""
        n = len(batch_counts)
        plan: list[Step] = []
        for entry in self.schedule(batch_counts):
            step = (int(entry),) if isinstance(entry, (int, np.integer)) else tuple(map(int, entry))
            if not step or any(i < 0 or i >= n for i in step):
                raise DataError(
                    [
                        f"{type(self).__name__}.schedule produced step {entry!r}; loader "
                        f"indices must be in 0..{n - 1}"
                    ]
                )
            plan.append(step)
        return plan

    def epoch_lengths(self, batch_counts: Sequence[int], n_epochs: int) -> list[int]:
        """The number of steps of each of the next ``n_epochs`` epochs, leaving this scheduler
        as it was.

        The Trainer asks this once per ``fit`` for the LR schedule's horizon, so a scheduler
        whose epochs differ in length gets the right one. The default plans the epochs on a copy
        of the scheduler (its generator included); override it when the lengths are known
        without planning.

        Example:
            >>> from mtlgraph.data.schedulers import MixedScheduler
            >>> MixedScheduler().epoch_lengths([3, 5], n_epochs=2)
            [5, 5]
        """
        probe = copy.deepcopy(self)
        return [len(probe.epoch_plan(batch_counts)) for _ in range(n_epochs)]

    def state_dict(self) -> dict[str, Any]:
        """The generator state (plain values, checkpoint-safe)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.rng.bit_generator.state = dict(state["rng"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class SequentialScheduler(BatchScheduler):
    """All batches of loader 0, then all of loader 1, and so on."""

    def schedule(self, batch_counts: Sequence[int]) -> list[int]:
        return [i for i, c in enumerate(batch_counts) for _ in range(c)]


class ShuffledScheduler(BatchScheduler):
    """Every batch of every loader once per epoch, in random order (the default)."""

    def schedule(self, batch_counts: Sequence[int]) -> list[int]:
        order = np.repeat(np.arange(len(batch_counts)), batch_counts)
        return self.rng.permutation(order).tolist()


class RoundRobinScheduler(BatchScheduler):
    """One batch of each loader in turn, skipping exhausted loaders, until all are exhausted."""

    def schedule(self, batch_counts: Sequence[int]) -> list[int]:
        return [
            i
            for r in range(max(batch_counts, default=0))
            for i, c in enumerate(batch_counts)
            if r < c
        ]


class MixedScheduler(BatchScheduler):
    """One batch of *every* loader per step, until the longest loader is exhausted.

    Shorter loaders start over (cycle) within the epoch. Each step therefore holds all tasks,
    which gradient-based balancers (PCGrad, CAGrad, MGDA) and diagnostics need.
    """

    def schedule(self, batch_counts: Sequence[int]) -> list[Step]:
        every = tuple(i for i, c in enumerate(batch_counts) if c > 0)
        return [every] * max(batch_counts, default=0)


SCHEDULERS: Registry[type[BatchScheduler]] = Registry(
    "batch scheduler",
    {
        "sequential": SequentialScheduler,
        "shuffled": ShuffledScheduler,
        "round_robin": RoundRobinScheduler,
        "mixed": MixedScheduler,
    },
    check=must_subclass(BatchScheduler, "batch scheduler"),
)
"""Batch schedulers by name: :func:`register_scheduler` adds one, ``SCHEDULERS.unregister``
removes one."""

SchedulerSpec = str | Mapping[str, Any] | BatchScheduler
"""A scheduler name, ``{"name": ..., **kwargs}``, or an instance."""


def register_scheduler(
    name: str, cls: type[BatchScheduler], *, override: bool = False
) -> type[BatchScheduler]:
    """Register a scheduler class under ``name`` (usable in Trainer configs and YAML).

    Registering the same class again is a no-op; another class under a taken name needs
    ``override=True``.

    Raises:
        ConfigError: The name is malformed or taken, or ``cls`` is no ``BatchScheduler``.

    Example:
        >>> from mtlgraph.data.schedulers import (
        ...     SCHEDULERS, SequentialScheduler, make_scheduler, register_scheduler)
        >>> class Reverse(SequentialScheduler):
        ...     def schedule(self, batch_counts):
        ...         return super().schedule(batch_counts)[::-1]
        >>> register_scheduler("reverse_doc", Reverse) is Reverse
        True
        >>> make_scheduler("reverse_doc", seed=0).epoch_plan([1, 2])
        [(1,), (1,), (0,)]
        >>> SCHEDULERS.unregister("reverse_doc") is Reverse
        True
    """
    return SCHEDULERS.register(name, cls, override=override)


def scheduler_names() -> list[str]:
    """Registered scheduler names."""
    return SCHEDULERS.names()


def scheduler_problems(spec: object) -> list[str]:
    """Every problem with a scheduler spec: an unknown name, unknown or missing arguments.

    An instance has none. ``seed`` may be given (it replaces the trainer's seed).

    Example:
        >>> scheduler_problems({"name": "mixed", "sed": 2})  # doctest: +ELLIPSIS
        ["batch scheduler 'mixed' takes no argument 'sed' (did you mean 'seed'?); ..."]
    """
    if isinstance(spec, BatchScheduler):
        return []
    if not isinstance(spec, (str, Mapping)):
        return [f"a batch scheduler is a name, a mapping with 'name' or an instance, not {spec!r}"]
    name, kwargs = split_spec(spec)
    if not isinstance(name, str) or name not in SCHEDULERS:
        return [SCHEDULERS.unknown(name)]
    return SCHEDULERS.check_kwargs(name, {"seed": 0, **kwargs})


def make_scheduler(spec: SchedulerSpec, seed: int) -> BatchScheduler:
    """Build a scheduler from a name, ``{"name": ..., **kwargs}``, or return an instance as is.

    Raises:
        ConfigError: An unknown name, or arguments the scheduler does not take (checked
            before it is built, with a suggestion).
    """
    if isinstance(spec, BatchScheduler):
        return spec
    problems = scheduler_problems(spec)
    if problems:
        raise ConfigError(problems)
    name, kwargs = split_spec(spec)
    kwargs.setdefault("seed", seed)
    return SCHEDULERS.get(str(name))(**kwargs)
