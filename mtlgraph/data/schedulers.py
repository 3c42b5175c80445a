"""Batch schedulers: which loader's batch (or batches) each training step uses.

A scheduler turns the number of batches of each training loader into an epoch's plan: a list of
steps, each a tuple of loader indices whose next batch joins that step. Most schedulers put one
batch in a step; ``mixed`` puts one batch of every loader in each step so gradient-based
balancers see several tasks at once.

Each scheduler owns a seeded ``numpy.random.Generator``; no global random state is used. Its
state is part of a checkpoint, so an interrupted epoch resumes with the same order.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError

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
                raise ValueError(
                    f"{type(self).__name__}.schedule produced step {entry!r}; loader indices "
                    f"must be in 0..{n - 1}"
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


_REGISTRY: dict[str, type[BatchScheduler]] = {
    "sequential": SequentialScheduler,
    "shuffled": ShuffledScheduler,
    "round_robin": RoundRobinScheduler,
    "mixed": MixedScheduler,
}


def register_scheduler(name: str, cls: type[BatchScheduler]) -> None:
    """Register a scheduler class under ``name`` (usable in Trainer configs and YAML).

    Example:
        >>> from mtlgraph.data.schedulers import register_scheduler, SequentialScheduler
        >>> class Reverse(SequentialScheduler):
        ...     def schedule(self, batch_counts):
        ...         return super().schedule(batch_counts)[::-1]
        >>> register_scheduler("reverse_doc", Reverse)
    """
    if not (isinstance(cls, type) and issubclass(cls, BatchScheduler)):
        raise ConfigError([f"scheduler '{name}' must be a BatchScheduler subclass"])
    if name in _REGISTRY:
        raise ConfigError([f"batch scheduler '{name}' is already registered"])
    _REGISTRY[name] = cls


def scheduler_names() -> list[str]:
    """Registered scheduler names."""
    return sorted(_REGISTRY)


def make_scheduler(spec: str | Mapping[str, Any] | BatchScheduler, seed: int) -> BatchScheduler:
    """Build a scheduler from a name, ``{"name": ..., **kwargs}``, or return an instance as is."""
    if isinstance(spec, BatchScheduler):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    else:
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(
            [
                f"unknown batch_scheduler {name!r}{did_you_mean(str(name), _REGISTRY)}; "
                f"known: {quoted(_REGISTRY)}"
            ]
        )
    kwargs.setdefault("seed", seed)
    return _REGISTRY[name](**kwargs)
