"""Datasets and loaders whose batches are ``(X_dict, Y_dict)`` pairs.

``X_dict`` maps field names to inputs; ``Y_dict`` maps *task names* to label tensors. Which tasks
a batch trains is decided by the keys of its ``Y_dict`` (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtlgraph.data.collate import (
    MASK_SUFFIX,
    Batch,
    RowBatch,
    collate_dicts,
    is_sequence_list,
    pad_sequences,
)
from mtlgraph.data.memmap import MappedFile, MapReader, is_memmap, read_ahead, reference
from mtlgraph.data.named import NamedDataset, NamedStream, StreamFeed
from mtlgraph.data.streams import StreamCursor
from mtlgraph.exceptions import DataError


class DictDataset(Dataset[Batch]):
    """A named split of examples: input fields ``X_dict`` and task labels ``Y_dict``.

    Args:
        name: Dataset name, the second part of score keys (no ``/``).
        split: Split name such as ``"train"``, ``"valid"``, ``"test"`` (no ``/``).
        X_dict: Field name -> tensor ``(N, ...)``, numpy array (floats: the default dtype),
            ``numpy.memmap`` (kept mapped, see :mod:`mtlgraph.data.memmap`), list of 1-D tensors
            (padded per batch with a ``<field>_mask``), or list of arbitrary objects.
        Y_dict: Task name -> label tensor ``(N,)`` or ``(N, L)`` (or numpy array or memmap).

    Raises:
        DataError: Lengths that differ, bad names, mask-field collisions (all at once).

    Example:
        >>> import torch
        >>> from mtlgraph import DictDataset
        >>> ds = DictDataset("circleDataset", "train", {"circle_data": torch.zeros(4, 2)},
        ...                  {"circle_task": torch.tensor([0, 1, 1, 0])})
        >>> len(ds), ds.batch(slice(0, 2))[1]["circle_task"].tolist()
        (4, [0, 1])
    """

    def __init__(
        self, name: str, split: str, X_dict: Mapping[str, Any], Y_dict: Mapping[str, Any]
    ) -> None:
        problems: list[str] = []
        for what, part in (("name", name), ("split", split)):
            if not isinstance(part, str) or not part or "/" in part:
                problems.append(f"dataset {what} {part!r} must be a non-empty string without '/'")
        if isinstance(name, str) and ":" in name:  # ':' marks a slice in score keys
            problems.append(
                f"dataset name {name!r} must not contain ':' (score keys write a slice of a "
                "dataset as '<dataset>:<slice>'); rename the dataset"
            )
        who = f"dataset '{name}' ({split})"
        X_maps, X_dict = _split_memmaps(X_dict, who, "X_dict", problems)
        Y_maps, Y_dict = _split_memmaps(Y_dict, who, "Y_dict", problems)
        X = _checked_inputs(X_dict, who, problems) if X_dict or not X_maps else {}
        X = {**X, **X_maps}
        Y: dict[str, Any] = {**_checked_labels(Y_dict, who, problems), **Y_maps}
        lengths = {f"X_dict['{k}']": len(v) for k, v in X.items()}
        lengths.update({f"Y_dict['{k}']": len(v) for k, v in Y.items()})
        if len(set(lengths.values())) > 1:
            listing = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            problems.append(f"{who}: fields have different lengths ({listing})")
        if problems:
            raise DataError(
                problems, header=f"invalid DictDataset {who}:" if len(problems) > 1 else None
            )
        self.name: str = name
        self.split: str = split
        self.X_dict: dict[str, Any] = X
        self.Y_dict: dict[str, Any] = Y  # tensors, or memmaps
        self._length = next(iter(lengths.values())) if lengths else 0
        self._kinds = {k: _kind(v) for k, v in X.items()}
        self._reader = MapReader()  # the mapped fields' and labels' rows

    @classmethod
    def from_tensors(
        cls,
        X: Any,
        Y: Any,
        name: str,
        split: str = "train",
        input_field: str = "data",
        task_name: str = "task",
    ) -> DictDataset:
        """``DictDataset(name, split, {input_field: X}, {task_name: Y})``: one field, one task.

        Args:
            X: Inputs ``(N, ...)``: a tensor, numpy array or list (as an ``X_dict`` value).
            Y: Labels ``(N,)`` or ``(N, C)`` (soft labels): a tensor or numpy array.
            name: Dataset name (no ``/`` or ``:``).
            split: Split name (default ``"train"``).
            input_field: The one ``X_dict`` field (default ``"data"``).
            task_name: The one task the labels belong to (default ``"task"``).

        Raises:
            DataError: As the constructor (lengths that differ, bad names).

        Example:
            >>> import torch
            >>> from mtlgraph import DictDataset
            >>> ds = DictDataset.from_tensors(torch.zeros(3, 2), torch.tensor([0, 1, 0]),
            ...                               name="toy", split="valid", task_name="t")
            >>> ds.split, list(ds.X_dict), list(ds.Y_dict), len(ds)
            ('valid', ['data'], ['t'], 3)
        """
        return cls(name, split, {input_field: X}, {task_name: Y})

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Batch:
        for value in (*self.X_dict.values(), *self.Y_dict.values()):
            if is_memmap(value):  # a truncated file is an error, not a SIGBUS
                self._reader.check_size(value)
        return _rows_at(self.X_dict, index), _rows_at(self.Y_dict, index)

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """Rows ``indices`` in order, read by :func:`~mtlgraph.data.collate_dicts` in one call."""
        return RowBatch(self, indices)

    def batch(
        self, index: slice | torch.Tensor | Sequence[int], pad_value: int | float = 0
    ) -> Batch:
        """The batch at ``index`` (a slice, or row indices); sequence fields padded with a mask."""
        rows: list[int] | None = None
        x: dict[str, Any] = {}
        for field, value in self.X_dict.items():
            kind = self._kinds[field]
            if kind == "tensor":
                x[field] = value[index]
                continue
            if kind == "memmap":
                x[field] = self._reader.gather(value, index)
                continue
            if rows is None:
                rows = _rows(index, self._length)
            items = [value[i] for i in rows]
            if kind == "seq":
                padded, mask = pad_sequences(items, pad_value)
                x[field], x[field + MASK_SUFFIX] = padded, mask
            else:
                x[field] = items
        y = {
            task: self._reader.gather(labels, index) if is_memmap(labels) else labels[index]
            for task, labels in self.Y_dict.items()
        }
        return x, y

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # memory maps travel as file references, not data
        for part in ("X_dict", "Y_dict"):
            state[part] = {k: reference(v) if is_memmap(v) else v for k, v in state[part].items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for part in ("X_dict", "Y_dict"):
            state[part] = {
                k: v.open() if isinstance(v, MappedFile) else v for k, v in state[part].items()
            }
        self.__dict__.update(state)

    @property
    def mapped(self) -> bool:
        """Whether a field or label is a memory map (its batches are read from a file)."""
        return any(is_memmap(v) for part in (self.X_dict, self.Y_dict) for v in part.values())

    def __repr__(self) -> str:
        return (
            f"DictDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"X={list(self.X_dict)}, Y={list(self.Y_dict)})"
        )


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if is_memmap(value):
        return "memmap"
    return "seq" if is_sequence_list(value) else "list"


def _rows_at(part: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Row ``index`` of every field of ``part`` (a memory-mapped row copied into a tensor)."""
    return {
        k: torch.from_numpy(np.array(v[index])) if is_memmap(v) else v[index]
        for k, v in part.items()
    }


def _split_memmaps(
    part: object, who: str, what: str, problems: list[str]
) -> tuple[dict[str, Any], Any]:
    """The memory-mapped entries of ``part`` (checked: a row per example), and the rest."""
    if not isinstance(part, Mapping):
        return {}, part
    maps = {k: v for k, v in part.items() if is_memmap(v)}
    for key, value in maps.items():
        if value.ndim == 0:
            problems.append(f"{who}: {what}['{key}'] is a scalar; it needs a row per example")
    rest = {k: v for k, v in part.items() if k not in maps}
    return {k: v for k, v in maps.items() if v.ndim > 0}, rest


def _checked_inputs(X_dict: object, who: str, problems: list[str]) -> dict[str, Any]:
    """The input fields as tensors or lists; a problem per malformed field is appended."""
    if not isinstance(X_dict, Mapping) or not X_dict:
        problems.append(f"{who}: X_dict must be a non-empty mapping of field -> data")
        return {}
    X: dict[str, Any] = {}
    value: Any
    for field, value in X_dict.items():
        if not isinstance(field, str) or not field:
            problems.append(f"{who}: X_dict key {field!r} must be a non-empty string")
            continue
        if isinstance(value, np.ndarray):
            value = torch.as_tensor(value)
            if value.is_floating_point():  # float64 numpy data -> torch's default (float32)
                value = value.to(torch.get_default_dtype())
        if isinstance(value, torch.Tensor):
            if value.ndim == 0:
                problems.append(f"{who}: X_dict['{field}'] is a scalar; it needs a row per example")
                continue
        elif isinstance(value, (list, tuple)):
            value = list(value)
            if is_sequence_list(value) and field + MASK_SUFFIX in X_dict:
                problems.append(
                    f"{who}: field '{field}' is padded with a '{field}{MASK_SUFFIX}' field, "
                    "which X_dict already holds; rename one"
                )
        else:
            problems.append(
                f"{who}: X_dict['{field}'] is a {type(value).__name__}; use a tensor, "
                "numpy array or list"
            )
            continue
        X[field] = value
    return X


def _checked_labels(Y_dict: object, who: str, problems: list[str]) -> dict[str, torch.Tensor]:
    """The label tensors by task; a problem per malformed entry is appended."""
    if not isinstance(Y_dict, Mapping):
        problems.append(f"{who}: Y_dict must be a mapping of task name -> labels")
        return {}
    Y: dict[str, torch.Tensor] = {}
    for task, labels in Y_dict.items():
        if not isinstance(task, str) or not task or "/" in task:
            problems.append(f"{who}: label name {task!r} must be a non-empty string without '/'")
            continue
        if isinstance(labels, (np.ndarray, list)):
            labels = torch.as_tensor(np.asarray(labels))
        if not isinstance(labels, torch.Tensor) or labels.ndim == 0:
            problems.append(f"{who}: Y_dict['{task}'] must be a tensor with a row per example")
            continue
        Y[task] = labels
    return Y


def _rows(index: slice | torch.Tensor | Sequence[int], n: int) -> list[int]:
    if isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, torch.Tensor):
        return [int(i) for i in index.tolist()]
    return [int(i) for i in index]


class EpochSampler(Sampler[int]):
    """Sequential or shuffled order, reproducible from ``(seed, epoch, pass)`` alone (epoch
    ``e`` pass 0 is seeded ``seed + e``); ``skip`` drops the next iteration's first rows.

    ``block > 1`` shuffles blocks instead of rows (:func:`block_order`): a different sampling
    distribution, still every row once an epoch.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, block: int = 1, window: int = 1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.pass_, self.skip = 0, 0
        self.block, self.window = block, window  # rows per shuffled block, rows mixed together

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (its pass 0)."""
        self.epoch, self.pass_ = epoch, 0

    def set_pass(self, pass_: int) -> None:
        """Select pass ``pass_`` of the current epoch (a restart with a fresh shuffle)."""
        self.pass_ = pass_

    def order(self) -> torch.Tensor | None:
        """This epoch's (and pass's) permutation, or ``None`` for sequential order."""
        if not self.shuffle:
            return None
        seed = self.seed + self.epoch
        if self.pass_:
            seed = int(
                np.random.SeedSequence([self.seed, self.epoch, self.pass_]).generate_state(1)[0]
            )
        generator = torch.Generator().manual_seed(seed)
        if self.block > 1:
            return block_order(self.n, self.block, self.window, generator)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[int]:
        perm = self.order()
        skip, self.skip = self.skip, 0  # a skip applies to the next iteration only
        if perm is None:
            return iter(range(skip, self.n))
        return _rows_of(perm[skip:])

    def __len__(self) -> int:
        return self.n


def block_order(n: int, block: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """A block shuffle of rows ``0..n-1``: the blocks of ``block`` neighbouring rows (rows
    ``k*block`` to ``(k+1)*block - 1``; the last may be shorter) in random order, then the
    rows of every ``window`` consecutive positions of that order shuffled among themselves.

    Every row comes exactly once; the result depends on ``generator``'s state alone. With
    ``window`` = the batch size, a batch holds the rows of about ``batch_size / block`` whole
    blocks: neighbouring rows of the file land in the same batch, which an exact shuffle
    (``torch.randperm``) makes unlikely. Reading a batch then costs one read per block.

    Example:
        >>> import torch
        >>> from mtlgraph.data.datasets import block_order
        >>> order = block_order(12, 3, 6, torch.Generator().manual_seed(1))  # batches of 6
        >>> order.tolist()
        [4, 9, 11, 3, 10, 5, 1, 6, 2, 8, 7, 0]
        >>> [sorted(order[i : i + 6].tolist()) for i in (0, 6)]  # blocks 1 and 3, then 0 and 2
        [[3, 4, 5, 9, 10, 11], [0, 1, 2, 6, 7, 8]]
    """
    blocks = torch.randperm(-(-n // block), generator=generator)
    out = torch.empty(n, dtype=torch.long)  # built in place, a chunk at a time: memory ~ n
    done, per = 0, max(1, CHUNK_ROWS // block)
    for first in range(0, len(blocks), per):
        rows = (blocks[first : first + per, None] * block + torch.arange(block)).reshape(-1)
        rows = rows[rows < n] if n % block else rows  # the short last block's missing rows
        out[done : done + len(rows)] = rows
        done += len(rows)
    full, span = n - n % window, window * max(1, CHUNK_ROWS // window)
    for first in range(0, full, span):
        chunk = out[first : min(full, first + span)].view(-1, window)
        mixed = torch.rand(chunk.shape, generator=generator).argsort(dim=1, stable=True)
        out[first : first + chunk.numel()] = chunk.gather(1, mixed).reshape(-1)
    out[full:] = out[full:][torch.randperm(n - full, generator=generator)]
    return out


CHUNK_ROWS = 1 << 14
"""Rows :func:`block_order` expands or mixes at once (bounds its temporary memory)."""


def _rows_of(perm: torch.Tensor, block: int = 1 << 16) -> Iterator[int]:
    """The rows of ``perm`` as ints, converted a block at a time (not one huge list)."""
    for part in perm.split(block):
        yield from part.tolist()


class DictDataLoader(DataLoader[Batch]):
    """A ``torch.utils.data.DataLoader`` yielding ``(X_dict, Y_dict)`` batches.

    It loads a :class:`DictDataset` or a :class:`~mtlgraph.NamedDataset` (map-style or stream);
    see docs/data.md for how batches are cut and streams shared among workers.

    Args:
        dataset: The dataset to load.
        batch_size: Examples per batch.
        shuffle: Reshuffle each epoch (call :meth:`set_epoch`; the Trainer does).
        seed: Seed of the shuffling order (order of epoch ``e`` uses ``seed + e``).
        drop_last: Drop the last incomplete batch.
        shuffle_block: Rows per block of a *block shuffle* (default 1: an exact uniform
            shuffle). With ``shuffle=True`` and ``shuffle_block=k > 1``, blocks of ``k``
            neighbouring rows are shuffled and each batch mixes the rows of the blocks it
            holds (:func:`block_order`): every row still comes once an epoch, but a batch
            holds whole blocks, a different sampling distribution. A shuffled batch of small
            rows from a memory-mapped file is then read as one run per block.
        **kwargs: Any other ``DataLoader`` argument (``num_workers``, ``persistent_workers``,
            ``pin_memory``, ``prefetch_factor``, ``sampler``, ``collate_fn``...).

    Example:
        >>> import torch
        >>> from mtlgraph import DictDataset, DictDataLoader
        >>> ds = DictDataset("d", "train", {"x": torch.arange(5.0)[:, None]},
        ...                  {"t": torch.tensor([0, 1, 0, 1, 0])})
        >>> [y["t"].tolist() for _, y in DictDataLoader(ds, batch_size=2)]
        [[0, 1], [0, 1], [0]]
    """

    dataset: Any

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_block: int = 1,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, (DictDataset, NamedDataset)):
            raise DataError(
                [
                    f"DictDataLoader needs a DictDataset or a NamedDataset, got "
                    f"{type(dataset).__name__}; wrap a torch dataset as "
                    "NamedDataset(name, split, dataset)"
                ]
            )
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))  # worker seeds
        self.options: dict[str, Any] = {
            "batch_size": batch_size,
            "shuffle": shuffle,
            "seed": seed,
            "drop_last": drop_last,
            "shuffle_block": shuffle_block,
            **{k: v for k, v in kwargs.items() if k not in ("sampler", "batch_sampler")},
        }
        """The constructor's arguments (a sharded copy for DDP is built with them)."""
        self.cursor: Any = None  # a stream's StreamCursor
        self._batches: tuple[tuple[int, ...], list[Batch]] | None = None  # see _in_order
        _check_block(dataset, shuffle_block, shuffle, kwargs)
        if isinstance(dataset, NamedStream):
            self._init_stream(dataset, batch_size, shuffle, seed, drop_last, kwargs)
            return
        if "sampler" not in kwargs and "batch_sampler" not in kwargs:
            window = max(int(batch_size or 1), 1)  # a batch mixes the rows of its blocks
            kwargs["sampler"] = EpochSampler(len(dataset), shuffle, seed, shuffle_block, window)
        elif shuffle:
            raise DataError(["shuffle=True cannot be combined with a custom sampler"])
        self._default_collate = "collate_fn" not in kwargs and isinstance(dataset, DictDataset)
        kwargs.setdefault("collate_fn", collate_dicts)
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, **kwargs)

    def _init_stream(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        kwargs: dict[str, Any],
    ) -> None:
        import copy

        bad = [k for k in ("sampler", "batch_sampler", "collate_fn") if k in kwargs]
        if bad:
            raise DataError(
                [
                    f"stream '{dataset.name}' ({dataset.split}) is batched by its workers; "
                    f"DictDataLoader takes no {', '.join(bad)} for it"
                ]
            )
        workers = max(int(kwargs.get("num_workers", 0)), 1)
        dataset = copy.copy(dataset)
        dataset.feed = StreamFeed(batch_size, seed, shuffle, drop_last, workers=workers)
        self.cursor = StreamCursor(workers)
        self._default_collate = False
        self._fed: tuple[Any, ...] | None = None
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)

    @property
    def is_stream(self) -> bool:
        """True for a loader over a stream (an ``IterableDataset``)."""
        return self.cursor is not None

    def __len__(self) -> int:
        if not self.is_stream:
            return super().__len__()
        feed = self.dataset.feed
        n = self.dataset.num_examples()
        if n is None:
            raise TypeError(f"stream '{self.dataset.name}' does not know its length")
        per = -(-n // (feed.world_size * feed.workers))
        batches = per // feed.batch_size if feed.drop_last else -(-per // feed.batch_size)
        return batches * feed.workers

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the sampler (shuffling order; ``DistributedSampler`` too)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def set_pass(self, pass_: int) -> None:
        """Select pass ``pass_`` of the epoch (a restart with a fresh shuffle)."""
        set_pass = getattr(self.sampler, "set_pass", None)
        if set_pass is not None:
            set_pass(pass_)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        return self.iterate()

    def iterate(self, start: int = 0, repeat: bool = False) -> Iterator[Batch]:
        """This epoch's batches from batch ``start``; a stream ignores ``start`` and, with
        ``repeat``, continues endlessly from its :attr:`cursor` (else yields one pass)."""
        if self.is_stream:
            return self._stream_iter(repeat)
        if self.num_workers > 0 or not self._default_collate or self.batch_size is None:
            sampler = self.sampler
            if hasattr(sampler, "skip") and self.batch_size is not None:
                sampler.skip = start * int(self.batch_size)
                return super().__iter__()
            it = super().__iter__()
            for _ in range(start):
                next(it)
            return it
        if getattr(self.dataset, "mapped", False):  # memory maps: read the next batch ahead
            return read_ahead(self._slice_iter(start))
        return self._slice_iter(start)

    def _stream_iter(self, repeat: bool) -> Iterator[Batch]:
        feed, cursor = self.dataset.feed, self.cursor
        feed.repeat = repeat
        feed.rotation = cursor.next_worker if repeat else 0
        feed.positions = list(cursor.positions) if repeat else []
        fed = (repeat, feed.rotation, tuple(feed.positions), feed.rank, feed.world_size)
        if self._fed is not None and fed != self._fed and self._iterator is not None:
            self._iterator._shutdown_workers()  # type: ignore[attr-defined]
            self._iterator = None  # persistent workers hold the old feed: start new ones
        self._fed = fed
        return _advancing(super().__iter__(), cursor if repeat else None)

    def _slice_iter(self, start: int) -> Iterator[Batch]:
        bs = int(self.batch_size or 1)
        n = len(self.dataset)
        sampler = self.sampler
        perm: torch.Tensor | None
        if isinstance(sampler, EpochSampler):
            perm = sampler.order()
        else:
            perm = torch.tensor(list(iter(sampler)), dtype=torch.long)
            n = len(perm)
        stop = n - n % bs if self.drop_last else n
        dataset = self.dataset
        rows = _chunk_rows(dataset, bs)
        if rows and perm is None and not dataset.mapped:  # the same views every epoch, cut once
            for x, y in self._in_order(bs, stop)[start:]:
                yield dict(x), dict(y)
            return
        if rows > bs:  # gather many batches' rows at once, then cut the batches as views
            for first in range(start * bs, stop, rows):
                last = min(first + rows, stop)
                X, Y = dataset.batch(slice(first, last) if perm is None else perm[first:last])
                count = -(-(last - first) // bs)
                yield from zip(_cut(X, bs, count), _cut(Y, bs, count), strict=True)
            return
        for begin in range(start * bs, stop, bs):
            end = min(begin + bs, n)
            yield dataset.batch(slice(begin, end) if perm is None else perm[begin:end])

    def _in_order(self, size: int, stop: int) -> list[Batch]:
        """The batches of rows ``0..stop`` as views, cut once while the tensors stay the same."""
        ds = self.dataset
        key = (size, stop, *map(id, ds.X_dict.values()), *map(id, ds.Y_dict.values()))
        if self._batches is None or self._batches[0] != key:
            X, Y = ds.batch(slice(0, stop))
            count = -(-stop // size)
            self._batches = (
                key,
                list(zip(_cut(X, size, count), _cut(Y, size, count), strict=True)),
            )
        return self._batches[1]


def _check_block(dataset: Any, block: object, shuffle: bool, kwargs: Mapping[str, Any]) -> None:
    """Refuse a ``shuffle_block`` the loader would not apply (all problems at once)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise DataError([f"shuffle_block must be an integer >= 1 (rows per block), got {block!r}"])
    if block == 1:
        return
    who = f"dataset '{getattr(dataset, 'name', '?')}'"
    problems = []
    if not shuffle:
        problems.append(f"{who}: shuffle_block={block} needs shuffle=True (it shuffles blocks)")
    if "sampler" in kwargs or "batch_sampler" in kwargs:
        problems.append(f"{who}: shuffle_block={block} cannot be combined with a custom sampler")
    if isinstance(dataset, NamedStream):
        problems.append(
            f"{who}: a stream is read in order by its workers; shuffle_block applies to "
            "map-style datasets only"
        )
    if problems:
        raise DataError(problems)


def _cut(part: Mapping[str, torch.Tensor], size: int, count: int) -> list[dict[str, Any]]:
    """``count`` dicts of consecutive ``size``-row views of every tensor of ``part``."""
    if not part:
        return [{} for _ in range(count)]
    splits = [v.split(size) for v in part.values()]
    return [dict(zip(part, views, strict=True)) for views in zip(*splits, strict=True)]


CHUNK_BYTES = 1 << 20
"""Bytes of rows an in-memory loader gathers at once (then cuts into batches)."""


def _chunk_rows(dataset: Any, batch_size: int) -> int:
    """Rows (whole batches) gathered at once when every field is an in-memory tensor or a
    memory map (one read of a few batches: a map's per-read costs are paid once), else 0."""
    if not isinstance(dataset, DictDataset):
        return 0
    fields = [*dataset.X_dict.values(), *dataset.Y_dict.values()]
    if not fields or not all(isinstance(v, torch.Tensor) or is_memmap(v) for v in fields):
        return 0
    row_bytes = sum(v.nbytes // max(len(v), 1) for v in fields) or 1
    return max(1, CHUNK_BYTES // row_bytes // batch_size) * batch_size


def _advancing(it: Iterator[Any], cursor: Any) -> Iterator[Batch]:
    """The batches of ``(batch, worker, position)`` items, recording positions in ``cursor``."""
    for batch, worker, pos in it:
        if cursor is not None:
            cursor.advance(worker, pos)
        yield batch


def _identity(batch: Any) -> Any:
    """The collate function of a stream loader: its workers yield whole batches."""
    return batch
