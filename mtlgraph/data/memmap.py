"""Memory-mapped numpy arrays as dataset fields: read a batch's rows, never the whole array.

``DictDataset`` keeps a ``numpy.memmap`` field (``np.load(path, mmap_mode="r")``) as it is; a
batch reads only its rows (:func:`gather`): a slice is one contiguous read, a shuffled batch's
rows are read in sorted order (sequential disk access) and put back in the batch's order, and
only the batch becomes a tensor. Scattered rows of a map larger than 256 MiB are read with
``os.preadv`` from the file the map names (no page faults, nothing left resident). The pages a
mapped read brings in count towards the process's resident memory until the kernel drops them;
:class:`PageBudget` tells the kernel to drop them (they stay in the page cache) whenever resident
memory has grown by ``budget`` bytes (read from ``/proc/self/statm``), so resident memory stays
bounded however large the file. A dataset sent to another process (DataLoader workers started
with ``spawn``) carries a :class:`MappedFile` reference per map, reopened there, never the data.
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import torch

from mtlgraph.exceptions import DataError

DEFAULT_BUDGET = 256 * 2**20
"""Bytes read from a map between two releases of its pages (256 MiB)."""


T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of ``items`` in order, each next one computed in a background thread while the
    caller works on the current one (one item ahead).

    A memory-mapped batch's reads (``os.preadv``, numpy copies) release the GIL, so they overlap
    the training step instead of adding to it. An exception raised while reading reaches the
    caller unchanged, at the item it belongs to. Closing the iterator early waits for the one
    read in flight.

    Example:
        >>> from mtlgraph.data.memmap import read_ahead
        >>> list(read_ahead(iter(range(4))))
        [0, 1, 2, 3]
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlgraph-read-ahead") as pool:
        pending: Future[Any] = pool.submit(next, items, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, items, _END)
            yield cast(T, item)


def is_memmap(value: object) -> bool:
    """True for a ``numpy.memmap`` (what ``np.load(path, mmap_mode=...)`` returns)."""
    return isinstance(value, np.memmap)


class ParallelReads:
    """A few threads that read a large map's scattered rows concurrently: with several reads in
    flight the disk (or the page cache) serves a batch several times faster than one row at a
    time (measured here: 256 random rows of a 4 GB file, 5.3 ms with one thread, 0.9 ms with
    four). The threads start on first use; a pickled copy (a DataLoader worker) starts its own.
    """

    def __init__(self, threads: int = 4) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, tasks: list[Any]) -> None:
        """Call every zero-argument callable of ``tasks``; their first error propagates."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mtlgraph-rows")
        for future in [self._pool.submit(task) for task in tasks]:
            future.result()

    def __getstate__(self) -> dict[str, Any]:
        return {"threads": self.threads, "_pool": None}


def gather(
    array: np.ndarray,
    index: slice | torch.Tensor | Sequence[int],
    reads: ParallelReads | None = None,
) -> torch.Tensor:
    """Rows ``index`` of ``array`` as a new tensor (a shuffled index is read in sorted order;
    with ``reads``, a large map's rows are read by its threads).

    Example:
        >>> import numpy as np, torch
        >>> from mtlgraph.data.memmap import gather
        >>> gather(np.arange(10.0), torch.tensor([7, 2, 5])).tolist()
        [7.0, 2.0, 5.0]
    """
    if isinstance(index, slice):
        return torch.from_numpy(np.array(array[index]))
    idx = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    order = np.argsort(idx, kind="stable")
    rows = np.empty((len(idx), *array.shape[1:]), dtype=array.dtype)
    large = is_memmap(array) and array.nbytes > DEFAULT_BUDGET and hasattr(os, "preadv")
    ref = reference(array) if large else None
    if isinstance(ref, MappedFile):  # scattered rows of a large map: file reads, no page faults
        wanted = idx[order]
        wanted = np.where(wanted < 0, wanted + len(array), wanted)
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= len(array)):
            raise IndexError(f"row index out of range for {len(array)} rows")
        rows[order] = _read_rows(ref, wanted, rows.dtype, reads)
    else:
        rows[order] = array[idx[order]]
    return torch.from_numpy(rows)


_FILES: dict[tuple[int, str], int] = {}  # (process id, file name) -> descriptor


def _read_rows(
    ref: MappedFile, rows: np.ndarray, dtype: np.dtype[Any], reads: ParallelReads | None = None
) -> np.ndarray:
    """Rows ``rows`` (sorted) of the C-contiguous array ``ref`` names, read with ``preadv``
    (split over ``reads``' threads when given and the batch is large enough to gain)."""
    key = (os.getpid(), ref.filename)
    fd = _FILES.get(key)
    if fd is None:
        fd = _FILES[key] = os.open(ref.filename, os.O_RDONLY)
    width = int(np.prod(ref.shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((len(rows), *ref.shape[1:]), dtype=dtype)
    view = out.reshape(-1).view(np.uint8).data
    listed = rows.tolist()

    def read(begin: int, end: int) -> None:
        for j in range(begin, end):
            row = listed[j]
            got = os.preadv(fd, [view[j * width : (j + 1) * width]], ref.offset + row * width)
            if got != width:
                raise DataError(
                    [f"'{ref.filename}' ended before row {row}: the file was truncated or replaced"]
                )

    if reads is None or len(listed) < 8 * reads.threads:
        read(0, len(listed))
        return out
    cuts = np.linspace(0, len(listed), reads.threads + 1).astype(int).tolist()
    reads.run([partial(read, a, b) for a, b in itertools.pairwise(cuts)])
    return out


FAULT_AROUND = 64 * 2**10
"""Bytes a page fault may map around the faulting address (Linux's default fault-around)."""


def mapped_bytes(rows: torch.Tensor, index: slice | torch.Tensor | Sequence[int]) -> int:
    """An upper bound of the bytes a gather of ``rows`` at ``index`` mapped into the process: its
    bytes for a slice, a fault-around window per row otherwise."""
    nbytes = rows.numel() * rows.element_size()
    if isinstance(index, slice):
        return nbytes + FAULT_AROUND
    row = nbytes // max(len(rows), 1)
    return len(rows) * max(row, FAULT_AROUND)


class PageBudget:
    """Drops a memory map's resident pages when the process's resident memory has grown by
    ``budget`` bytes since the last release (read from ``/proc/self/statm``; where that file
    is absent, after every ``budget`` bytes :func:`mapped_bytes` estimates). Measuring beats
    estimating: a page fault may map a whole large folio of the page cache, not one page."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.read: dict[int, int] = {}
        self.base: int | None = None  # resident bytes after the last release

    def account(self, array: Any, nbytes: int) -> None:
        """``nbytes`` were read from ``array``; release its pages when over budget."""
        handle = getattr(array, "_mmap", None)
        if handle is None or len(handle) <= self.budget:
            return  # a map no larger than the budget may stay resident
        resident = resident_bytes()
        if resident is not None:
            if self.base is None:
                self.base = resident
            if resident - self.base >= self.budget:
                release(handle)
                self.base = resident_bytes()
            return
        key = id(handle)
        self.read[key] = self.read.get(key, 0) + nbytes
        if self.read[key] >= self.budget:
            self.read[key] = 0
            release(handle)

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget, "read": {}, "base": None}


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (``None`` without ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except FileNotFoundError:  # not Linux: the caller estimates instead
        return None
    return pages * mmap.PAGESIZE


def release(handle: Any) -> None:
    """Tell the kernel this process no longer needs the map's pages (a no-op where the
    platform has no ``madvise``)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None and hasattr(handle, "madvise"):
        handle.madvise(advice)


class MappedFile(NamedTuple):
    """A picklable reference to a C-contiguous memory-mapped array: reopened, not copied, in the
    process that unpickles it (DataLoader workers started with ``spawn``)."""

    filename: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def open(self) -> np.memmap:
        """The array, mapped read-only."""
        return np.memmap(
            self.filename,
            dtype=np.dtype(self.dtype),
            mode="r",
            offset=self.offset,
            shape=self.shape,
        )


def reference(array: np.ndarray) -> MappedFile | np.ndarray:
    """A :class:`MappedFile` for ``array`` (or ``array`` itself when it cannot be reopened:
    not C-contiguous, or no file name)."""
    root: Any = array
    while isinstance(root.base, np.memmap):
        root = root.base
    filename = getattr(root, "filename", None)
    if filename is None or not array.flags.c_contiguous:
        return array
    offset = int(root.offset) + (array.ctypes.data - root.ctypes.data)
    return MappedFile(str(filename), offset, array.dtype.str, tuple(array.shape))
