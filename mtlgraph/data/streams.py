"""Streamed examples: the protocol a streaming source implements, and how streams are read.

A source implements :class:`ExampleStream`; a :class:`Consumer` per rank x worker reads its share
of each pass and a :class:`StreamCursor` records each :class:`Position` for an exact resume (the
rules: docs/data.md, "Streams: splitting and exact resume").

Example:
    >>> import torch
    >>> from mtlgraph.data.streams import ExampleStream
    >>> class Ranges(ExampleStream):
    ...     def num_units(self):
    ...         return 2
    ...     def iter_unit(self, unit, start, seed):
    ...         for i in range(start, 3):
    ...             yield {"x": torch.tensor([float(10 * unit + i)])}, {"t": torch.tensor(i % 2)}
    >>> [float(x["x"]) for x, _ in Ranges()]
    [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mtlgraph.exceptions import CheckpointError, DataError

Example = tuple[dict[str, Any], dict[str, Any]]
"""One example: ``(x_dict, y_dict)``."""


class ExampleStream(IterableDataset[Example]):
    """Base class of streaming sources: implement :meth:`num_units` and :meth:`iter_unit`.

    Iterating the stream itself yields every unit's examples in unit order (seed 0), so it is
    also a plain ``IterableDataset``; mtlgraph's loaders split and resume it through the
    protocol instead (see the module docstring).
    """

    @abstractmethod
    def num_units(self) -> int:
        """Number of independently readable units (files, shards); the same in every process."""

    @abstractmethod
    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[Example]:
        """Examples of ``unit`` from its example number ``start`` on, in an order fixed by
        ``(unit, seed)`` (a source that cannot seek may read and drop)."""

    def num_examples(self) -> int | None:
        """Examples in one pass, if known."""
        return None

    def __iter__(self) -> Iterator[Example]:
        for unit in range(self.num_units()):
            yield from self.iter_unit(unit, 0, 0)


class IterableStream(ExampleStream):
    """Any ``IterableDataset`` (or iterable) as a one-unit stream; resuming reads and drops."""

    def __init__(self, iterable: Iterable[Example], size: int | None = None) -> None:
        self.iterable, self.size = iterable, size
        self.labels = getattr(iterable, "labels", None)

    def num_units(self) -> int:
        return 1

    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[Example]:
        return islice(iter(self.iterable), start, None)

    def num_examples(self) -> int | None:
        if self.size is not None:
            return self.size
        size = getattr(self.iterable, "num_examples", None)
        return int(size()) if callable(size) else None


class Position(NamedTuple):
    """Where a consumer is: pass ``pass_``, unit ``unit`` of its units in that pass (an index into
    the pass's list, not a unit id), ``offset`` examples into that unit, ``seen`` examples into
    the pass (all units, all consumers: the example-split rule counts them)."""

    pass_: int = 0
    unit: int = 0
    offset: int = 0
    seen: int = 0


def unit_order(n_units: int, seed: int, pass_: int, shuffle: bool) -> list[int]:
    """The units of pass ``pass_`` in reading order (a permutation when ``shuffle``)."""
    if not shuffle:
        return list(range(n_units))
    rng = np.random.Generator(np.random.PCG64([seed, pass_, 0x5EED]))
    return [int(u) for u in rng.permutation(n_units)]


def unit_seed(seed: int, pass_: int, unit: int) -> int:
    """The ``seed`` passed to ``iter_unit`` for ``unit`` in pass ``pass_``."""
    seq = np.random.SeedSequence([seed, pass_, unit])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


@dataclass
class Consumer:
    """One reader of a stream: consumer ``index`` of ``count`` (rank x worker)."""

    stream: ExampleStream
    index: int
    count: int
    seed: int = 0
    shuffle: bool = False

    def examples(self, pos: Position, repeat: bool) -> Iterator[tuple[Example, Position]]:
        """This consumer's examples from ``pos`` on, each with the position after it."""
        n_units = self.stream.num_units()
        by_unit = n_units >= self.count
        while True:
            order = unit_order(n_units, self.seed, pos.pass_, self.shuffle)
            mine = order[self.index :: self.count] if by_unit else order
            fresh, got = pos.unit == 0 and pos.offset == 0, False
            for u in range(pos.unit, len(mine)):
                start = pos.offset if u == pos.unit else 0
                index = pos.seen
                unit = mine[u]
                items = self.stream.iter_unit(unit, start, unit_seed(self.seed, pos.pass_, unit))
                for offset, example in enumerate(items, start + 1):
                    index += 1
                    if by_unit or (index - 1) % self.count == self.index:
                        got = True
                        yield example, Position(pos.pass_, u, offset, index)
                pos = Position(pos.pass_, u + 1, 0, index)
            if not repeat:
                return
            if fresh and not got:
                raise DataError(
                    [
                        f"stream consumer {self.index} of {self.count} (rank x worker) read a "
                        "whole pass without an example; use fewer num_workers or ranks, or "
                        "more data"
                    ]
                )
            pos = Position(pos.pass_ + 1, 0, 0, 0)


def as_example(item: object, where: str) -> Example:
    """``item`` as an ``(x_dict, y_dict)`` pair of tensors (numpy arrays, numbers converted).

    Raises:
        DataError: ``item`` is not a pair of dicts.
    """
    if not (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[0], Mapping)
        and isinstance(item[1], Mapping)
    ):
        raise DataError(
            [f"{where} gave a {type(item).__name__}; items must be (x_dict, y_dict) pairs"]
        )
    x = {k: _tensor(v) for k, v in item[0].items()}
    y = {k: _tensor(v) for k, v in item[1].items()}
    return x, y


def _tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value) if value.dtype != np.object_ else list(value)
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return torch.as_tensor(value)
    return value


@dataclass
class StreamCursor:
    """The positions of a loader's consumers after the batches it has handed out.

    ``positions[c]`` is where logical worker ``c`` continues; ``next_worker`` delivers next.

    Example:
        >>> from mtlgraph.data.streams import Position, StreamCursor
        >>> cursor = StreamCursor(workers=2)
        >>> cursor.advance(0, Position(0, 0, 4, 4))
        >>> StreamCursor.from_state(cursor.state_dict(), workers=2).next_worker
        1
    """

    workers: int = 1
    next_worker: int = 0
    positions: list[Position] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = [Position()] * self.workers

    def advance(self, worker: int, pos: Position) -> None:
        """Worker ``worker`` delivered a batch that ends at ``pos``."""
        self.positions[worker] = pos
        self.next_worker = (worker + 1) % self.workers

    def state_dict(self) -> dict[str, Any]:
        """Plain values (checkpoint-safe)."""
        return {
            "workers": self.workers,
            "next_worker": self.next_worker,
            "positions": [list(p) for p in self.positions],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], workers: int) -> StreamCursor:
        """The cursor :meth:`state_dict` saved.

        Raises:
            CheckpointError: It was saved with another number of workers.
        """
        if int(state["workers"]) != workers:
            raise CheckpointError(
                f"cannot resume: the checkpoint's stream was read by {state['workers']} "
                f"worker(s) per rank, this loader has {workers}; resume with the num_workers "
                "of the interrupted run"
            )
        positions = [Position(*map(int, p)) for p in state["positions"]]
        return cls(workers, int(state["next_worker"]), positions)
