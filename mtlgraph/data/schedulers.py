"""Batch schedulers: which loader's batch (or batches) each training step uses.

A scheduler turns the number of batches of each training loader into an epoch's plan: a list of
steps, each a tuple of loader indices whose next batch joins that step (docs/data.md). Schedulers
live in the registry :data:`SCHEDULERS`; each owns a seeded generator saved in checkpoints.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.registry import Registry

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
            if not step or min(step) < 0 or max(step) >= n:
                raise DataError(
                    [
                        f"{type(self).__name__}.schedule produced step {entry!r}; loader "
                        f"indices must be in 0..{n - 1}"
                    ]
                )
            plan.append(step)
        return plan

    def epoch_lengths(self, batch_counts: Sequence[int], n_epochs: int) -> list[int]:
        """The steps of each of the next ``n_epochs`` epochs (planned on a copy of ``self``).

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
    """One batch of *every* loader per step (shorter loaders cycle) until the longest ends."""

    def schedule(self, batch_counts: Sequence[int]) -> list[Step]:
        every = tuple(i for i, c in enumerate(batch_counts) if c > 0)
        return [every] * max(batch_counts, default=0)


class SamplingScheduler(BatchScheduler):
    """Base of the sampling schedulers: each of ``steps_per_epoch`` steps draws one loader with
    probability ``p_i`` (:meth:`probabilities`); the Trainer calls :meth:`configure` first."""

    needs_sizes = True  # the probabilities use the dataset sizes

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.names: list[str] = []
        self.sizes: list[int | None] = []
        self.steps_per_epoch = 0
        self.n_epochs = 1
        self.epoch = 0  # epochs planned so far (0-based index of the next one)

    def configure(
        self,
        names: Sequence[str],
        sizes: Sequence[int | None],
        steps_per_epoch: int,
        n_epochs: int,
    ) -> None:
        """Set the training datasets (names, examples per pass) and the epoch length.

        Raises:
            ConfigError: A dataset size the probabilities need is unknown (a stream), or the
                scheduler's arguments do not fit the datasets (every problem at once).
        """
        self.names, self.sizes = list(names), list(sizes)
        self.steps_per_epoch, self.n_epochs = int(steps_per_epoch), max(int(n_epochs), 1)
        problems = self.check()
        if problems:
            raise ConfigError([f"batch_scheduler: {p}" for p in problems])

    def check(self) -> list[str]:
        """Problems with this scheduler for the configured datasets."""
        if not self.needs_sizes:
            return []
        return [
            f"'{type(self).__name__}' weighs datasets by size, but the size of stream '{name}' "
            "is unknown; give NamedDataset(..., size=N) or use the 'uniform' or 'weighted' "
            "scheduler"
            for name, size in zip(self.names, self.sizes, strict=True)
            if size is None
        ]

    @abstractmethod
    def probabilities(self, epoch: int) -> np.ndarray:
        """The probability of drawing each loader in epoch ``epoch`` (0-based), summing to 1."""

    def schedule(self, batch_counts: Sequence[int]) -> list[int]:
        p = np.asarray(self.probabilities(self.epoch), dtype=np.float64)
        self.epoch += 1
        draws = self.rng.choice(len(p), size=self.steps_per_epoch, p=p / p.sum())
        return [int(i) for i in draws]

    def epoch_lengths(self, batch_counts: Sequence[int], n_epochs: int) -> list[int]:
        return [self.steps_per_epoch] * n_epochs

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch = int(state.get("epoch", 0))

    def _known_sizes(self) -> np.ndarray:
        return np.asarray([float(s or 0) for s in self.sizes])


class UniformScheduler(SamplingScheduler):
    """Every loader equally likely: ``p_i = 1 / K``.

    Example:
        >>> from mtlgraph.data.schedulers import UniformScheduler
        >>> s = UniformScheduler(seed=0)
        >>> s.configure(["a", "b"], [10, None], steps_per_epoch=4, n_epochs=1)
        >>> s.probabilities(0).tolist(), len(s.epoch_plan([5, 0]))
        ([0.5, 0.5], 4)
    """

    needs_sizes = False

    def probabilities(self, epoch: int) -> np.ndarray:
        return np.full(len(self.names), 1.0 / len(self.names))


class ProportionalScheduler(SamplingScheduler):
    """Loaders drawn in proportion to their dataset sizes: ``p_i = N_i / sum_j N_j``.

    Example:
        >>> from mtlgraph.data.schedulers import ProportionalScheduler
        >>> s = ProportionalScheduler()
        >>> s.configure(["a", "b"], [30, 10], steps_per_epoch=4, n_epochs=1)
        >>> s.probabilities(0).tolist()
        [0.75, 0.25]
    """

    def probabilities(self, epoch: int) -> np.ndarray:
        n = self._known_sizes()
        return n / n.sum()


class TemperatureScheduler(SamplingScheduler):
    """Temperature sampling (T5): ``p_i ∝ min(N_i, cap) ^ (1 / temperature)``.

    ``temperature=1`` is proportional sampling (up to the cap), large temperatures approach
    uniform sampling; ``cap`` (examples) stops the largest datasets from dominating.

    Example:
        >>> from mtlgraph.data.schedulers import TemperatureScheduler
        >>> s = TemperatureScheduler(temperature=2.0, cap=400)
        >>> s.configure(["a", "b", "c"], [900, 100, 25], steps_per_epoch=10, n_epochs=1)
        >>> [round(p, 3) for p in s.probabilities(0).tolist()]  # sqrt of 400, 100, 25
        [0.571, 0.286, 0.143]
    """

    def __init__(self, temperature: float = 2.0, cap: int | None = None, seed: int = 0) -> None:
        problems = [] if temperature > 0 else [f"temperature must be > 0, got {temperature}"]
        if cap is not None and not cap > 0:
            problems.append(f"cap must be a positive number of examples, got {cap}")
        if problems:  # at construction: Trainer(...) and 'mtlgraph check' report them
            raise ConfigError(problems)
        super().__init__(seed)
        self.temperature, self.cap = float(temperature), cap

    def probabilities(self, epoch: int) -> np.ndarray:
        n = self._known_sizes()
        if self.cap is not None:
            n = np.minimum(n, float(self.cap))
        w = n ** (1.0 / self.temperature)
        return w / w.sum()


class AnnealedScheduler(SamplingScheduler):
    """Annealed sampling (Stickland & Murray 2019): ``p_i ∝ N_i ^ alpha_e`` with
    ``alpha_e = 1 - 0.8 (e - 1) / (E - 1)`` in epoch ``e`` of ``E`` (1-based): proportional
    at first, close to uniform at the end.

    Example:
        >>> from mtlgraph.data.schedulers import AnnealedScheduler
        >>> s = AnnealedScheduler()
        >>> s.configure(["a", "b"], [90, 10], steps_per_epoch=10, n_epochs=3)
        >>> [round(float(s.probabilities(e)[0]), 3) for e in range(3)]  # alpha 1, 0.6, 0.2
        [0.9, 0.789, 0.608]
    """

    def alpha(self, epoch: int) -> float:
        """``alpha_e`` of the 0-based epoch ``epoch``."""
        if self.n_epochs <= 1:
            return 1.0
        return 1.0 - 0.8 * min(epoch, self.n_epochs - 1) / (self.n_epochs - 1)

    def probabilities(self, epoch: int) -> np.ndarray:
        w = self._known_sizes() ** self.alpha(epoch)
        return w / w.sum()


class WeightedScheduler(SamplingScheduler):
    """Loaders drawn with user weights: ``p_i = w_i / sum_j w_j``; ``weights`` maps every training
    dataset's name to a weight ``>= 0``.

    Example:
        >>> from mtlgraph.data.schedulers import WeightedScheduler
        >>> s = WeightedScheduler(weights={"a": 3, "b": 1})
        >>> s.configure(["a", "b"], [None, None], steps_per_epoch=4, n_epochs=1)
        >>> s.probabilities(0).tolist()
        [0.75, 0.25]
    """

    needs_sizes = False

    def __init__(self, weights: Mapping[str, float], seed: int = 0) -> None:
        super().__init__(seed)
        self.weights = {str(k): float(v) for k, v in dict(weights).items()}

    def check(self) -> list[str]:
        problems = [
            f"weights has no entry for dataset '{n}'; give every training dataset a weight"
            for n in self.names
            if n not in self.weights
        ]
        problems += [
            f"weights names '{k}', which is no training dataset{did_you_mean(k, self.names)}; "
            f"the training datasets are {quoted(self.names)}"
            for k in self.weights
            if k not in self.names
        ]
        problems += [
            f"weights['{k}'] must be a finite number >= 0, got {w}"
            for k, w in self.weights.items()
            if not (w >= 0 and np.isfinite(w))
        ]
        if not problems and not sum(self.weights[n] for n in self.names) > 0:
            problems.append("weights are all 0; give at least one dataset a positive weight")
        return problems

    def probabilities(self, epoch: int) -> np.ndarray:
        w = np.asarray([self.weights[n] for n in self.names])
        return w / w.sum()


SCHEDULERS: Registry[type[BatchScheduler]] = Registry(
    "batch scheduler",
    {
        "sequential": SequentialScheduler,
        "shuffled": ShuffledScheduler,
        "round_robin": RoundRobinScheduler,
        "mixed": MixedScheduler,
        "uniform": UniformScheduler,
        "proportional": ProportionalScheduler,
        "temperature": TemperatureScheduler,
        "annealed": AnnealedScheduler,
        "weighted": WeightedScheduler,
    },
    base=BatchScheduler,
)
"""Batch schedulers by name; ``SCHEDULERS.build(spec, path, seed=...)`` makes one (a spec's
``seed`` replaces the trainer's), ``SCHEDULERS.register`` adds one.

Example:
    >>> from mtlgraph.data.schedulers import SCHEDULERS, SequentialScheduler
    >>> @SCHEDULERS.register("reverse_doc")
    ... class Reverse(SequentialScheduler):
    ...     def schedule(self, batch_counts):
    ...         return super().schedule(batch_counts)[::-1]
    >>> SCHEDULERS.build("reverse_doc", seed=0).epoch_plan([1, 2])
    [(1,), (1,), (0,)]
    >>> SCHEDULERS.problems({"name": "mixed", "sed": 2}, "batch_scheduler")  # doctest: +ELLIPSIS
    ["batch_scheduler.sed: batch scheduler 'mixed' takes no argument 'sed' (did you mean ..."]
    >>> SCHEDULERS.unregister("reverse_doc") is Reverse
    True
"""
