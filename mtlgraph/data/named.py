"""Any PyTorch dataset under a name and split: :class:`NamedDataset`.

A map-style or iterable torch dataset of ``(x_dict, y_dict)`` items becomes one the
:class:`~mtlgraph.DictDataLoader` and the Trainer accept, collated like
:class:`~mtlgraph.DictDataset` rows; ``NamedDataset(name, split, iterable)`` returns a
:class:`NamedStream` (see :mod:`mtlgraph.data.streams`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mtlgraph.data.collate import Batch, collate_dicts
from mtlgraph.data.streams import (
    Consumer,
    Example,
    ExampleStream,
    IterableStream,
    Position,
    as_example,
)
from mtlgraph.exceptions import DataError


class NamedDataset(Dataset[Example]):
    """A name and split for any torch dataset whose items are ``(x_dict, y_dict)`` pairs.

    Args:
        name: Dataset name, the second part of score keys (no ``/``).
        split: Split name such as ``"train"`` or ``"valid"`` (no ``/``).
        dataset: A map-style ``Dataset`` (``__getitem__`` and ``__len__``) or an
            ``IterableDataset``; for the latter a :class:`NamedStream` is returned.
        labels: The task names the items label; by default read from the first item (map-style)
            or the stream's ``labels`` attribute (``None``: not checked against the model).
        size: Examples in one pass of a stream whose source does not say (needed by the
            ``proportional``, ``temperature`` and ``annealed`` batch schedulers).

    Raises:
        DataError: A bad name or split, or a dataset of another kind (all at once).

    Example:
        >>> import torch
        >>> from torch.utils.data import Dataset
        >>> from mtlgraph import DictDataLoader, NamedDataset
        >>> class Squares(Dataset):
        ...     def __len__(self):
        ...         return 5
        ...     def __getitem__(self, i):
        ...         return {"x": torch.tensor([float(i)])}, {"t": torch.tensor(i * i)}
        >>> ds = NamedDataset("squares", "train", Squares())
        >>> ds.labels, len(ds)
        (('t',), 5)
        >>> [y["t"].tolist() for _, y in DictDataLoader(ds, batch_size=2)]
        [[0, 1], [4, 9], [16]]
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> NamedDataset:
        source = args[2] if len(args) > 2 else kwargs.get("dataset")
        if cls is NamedDataset and isinstance(source, IterableDataset):
            cls = NamedStream
        return super().__new__(cls)

    def __init__(
        self,
        name: str,
        split: str,
        dataset: Any,
        labels: Sequence[str] | None = None,
        size: int | None = None,
    ) -> None:
        problems = [
            f"dataset {what} {part!r} must be a non-empty string without '/'"
            for what, part in (("name", name), ("split", split))
            if not isinstance(part, str) or not part or "/" in part
        ]
        iterable = isinstance(dataset, IterableDataset)
        if not iterable and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            problems.append(
                f"dataset '{name}' ({split}) is a {type(dataset).__name__}; NamedDataset needs a "
                "torch Dataset with __getitem__ and __len__, or an IterableDataset"
            )
        if problems:
            raise DataError(problems, header="invalid NamedDataset:" if len(problems) > 1 else None)
        self.name: str = name
        self.split: str = split
        self.dataset = dataset
        self._labels = tuple(labels) if labels is not None else None
        self.size = size

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The task names the items label (``None``: unknown)."""
        if self._labels is None and len(self) > 0:
            self._labels = tuple(self[0][1])
        return self._labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Example:
        return as_example(self.dataset[index], f"dataset '{self.name}' ({self.split}) item {index}")

    def num_examples(self) -> int | None:
        """Examples in one pass."""
        return len(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"dataset={type(self.dataset).__name__})"
        )


@dataclass
class StreamFeed:
    """How a loader reads its copy of a :class:`NamedStream`: batching, consumer split, start."""

    batch_size: int = 1
    seed: int = 0
    shuffle: bool = False
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # consumers per rank: max(num_workers, 1)
    repeat: bool = False  # training: each consumer starts its next pass when done
    rotation: int = 0  # the logical worker that delivers the first batch
    positions: list[Position] = field(default_factory=list)  # per logical worker; [] = start


class NamedStream(NamedDataset, IterableDataset[Example]):
    """A :class:`NamedDataset` over an ``IterableDataset``; see :mod:`mtlgraph.data.streams`.

    Iterated directly it yields examples; a loader's copy (with :attr:`feed` set) yields
    ``(batch, logical worker, position after the batch)`` for its cursor.

    Example:
        >>> import torch
        >>> from mtlgraph import DictDataLoader, NamedDataset
        >>> class Counter(torch.utils.data.IterableDataset):
        ...     def __iter__(self):
        ...         for i in range(5):
        ...             yield {"x": torch.tensor([float(i)])}, {"t": torch.tensor(i % 2)}
        >>> ds = NamedDataset("counter", "valid", Counter())
        >>> type(ds).__name__
        'NamedStream'
        >>> [y["t"].tolist() for _, y in DictDataLoader(ds, batch_size=2)]
        [[0, 1], [0, 1], [0]]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # NamedDataset's arguments
        super().__init__(*args, **kwargs)
        source, size = self.dataset, self.size
        self.stream: ExampleStream = (
            source if isinstance(source, ExampleStream) else IterableStream(source, size)
        )
        self.feed: StreamFeed | None = None

    @property
    def labels(self) -> tuple[str, ...] | None:
        if self._labels is None and getattr(self.stream, "labels", None) is not None:
            self._labels = tuple(self.stream.labels)  # type: ignore[attr-defined]
        return self._labels

    def __len__(self) -> int:
        n = self.num_examples()
        if n is None:
            raise TypeError(f"stream '{self.name}' ({self.split}) does not know its length")
        return n

    def num_examples(self) -> int | None:
        return self.size if self.size is not None else self.stream.num_examples()

    def __getitem__(self, index: int) -> Example:
        raise TypeError(f"stream '{self.name}' ({self.split}) is not indexable; iterate it")

    def __iter__(self) -> Iterator[Any]:
        if self.feed is None:
            where = f"stream '{self.name}' ({self.split})"
            return (as_example(item, where) for item in self.stream)
        return self._batches(self.feed)

    def _batches(self, feed: StreamFeed) -> Iterator[tuple[Batch, int, Position]]:
        info = get_worker_info()
        logical = (feed.rotation + (info.id if info is not None else 0)) % feed.workers
        consumer = Consumer(
            self.stream,
            feed.rank * feed.workers + logical,
            feed.world_size * feed.workers,
            feed.seed,
            feed.shuffle,
        )
        start = feed.positions[logical] if feed.positions else Position()
        where = f"stream '{self.name}' ({self.split})"
        rows: list[Example] = []
        last = start
        for item, last in consumer.examples(start, feed.repeat):
            rows.append(as_example(item, where))
            if len(rows) == feed.batch_size:
                yield collate_dicts(rows), logical, last
                rows = []
        if rows and not feed.drop_last:
            yield collate_dicts(rows), logical, last


def dataset_labels(dataset: Any) -> tuple[str, ...] | None:
    """The task names a dataset labels: a ``DictDataset``'s ``Y_dict`` keys, a
    ``NamedDataset``'s :attr:`~NamedDataset.labels` (``None``: unknown)."""
    if hasattr(dataset, "Y_dict"):
        return tuple(dataset.Y_dict)
    return getattr(dataset, "labels", None)


def dataset_size(dataset: Any) -> int | None:
    """Examples in one pass of a dataset (``None``: a stream that does not say)."""
    size = getattr(dataset, "num_examples", None)
    if callable(size):
        n = size()
        return None if n is None else int(n)
    return len(dataset)
