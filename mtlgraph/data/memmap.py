"""Memory-mapped numpy arrays as dataset fields: read a batch's rows, never the whole array.

A ``DictDataset`` keeps a ``numpy.memmap`` field as it is and reads a batch's rows through its
:class:`MapReader`; a copy sent to another process carries a :class:`MappedFile` reference per
map, never the data. docs/data.md ("Memory behaviour") describes the reads and the memory bound.
"""

from __future__ import annotations

import errno
import mmap
import os
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    caller works on the current one; an exception reaches the caller at its item, unchanged.

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


class MapReader:
    """Reads a batch's rows from memory-mapped arrays: the one way a mapped field or label of a
    :class:`~mtlgraph.DictDataset` becomes a batch tensor (one reader per dataset).

    Distinct rows are read in file order, coalesced into runs, and returned in the batch's
    order; a C-contiguous map larger than ``budget`` is read with ``os.preadv``, any other is
    indexed with numpy under a :class:`PageBudget` (docs/data.md, "Memory behaviour").

    Args:
        budget: Bytes; larger maps are read from their file, and numpy-indexed maps release their
            pages whenever resident memory has grown by this much (default 256 MiB).

    Example:
        >>> import numpy as np, torch
        >>> from mtlgraph.data.memmap import MapReader
        >>> MapReader().gather(np.arange(10.0), torch.tensor([7, 2, 7, 5])).tolist()
        [7.0, 2.0, 7.0, 5.0]
    """

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.pages = PageBudget(budget)
        self._files: dict[tuple[int, str], int] = {}  # (process id, file name) -> descriptor
        self.nowait = NOWAIT is not None  # try the page cache first (RWF_NOWAIT reads)

    def gather(
        self, array: np.ndarray, index: slice | torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """Rows ``index`` of ``array`` (a slice, or row numbers in any order, negative ones
        counting from the end) as a new tensor, in the order of ``index``.

        Raises:
            IndexError: A row number outside the array.
            DataError: The file ended before a row (truncated or replaced under the map).
        """
        n = len(array)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self.gather(array, range(start, stop, step))
            return torch.from_numpy(self._read(array, np.arange(start, max(start, stop))))
        idx = np.asarray(index.numpy() if isinstance(index, torch.Tensor) else index, np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        rows, where = np.unique(idx, return_inverse=True)  # ascending, each row once
        block = self._read(array, rows)
        if len(rows) == len(idx) and bool((rows == idx).all()):
            return torch.from_numpy(block)
        return torch.from_numpy(block[where])  # the batch's order, duplicates restored

    def _read(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of ``array``."""
        ref = reference(array) if self._direct(array) else None
        if isinstance(ref, MappedFile):
            return self._pread(ref, rows)
        if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
            out = np.array(array[int(rows[0]) : int(rows[-1]) + 1])  # one run: a slice
            scattered = False
        else:
            out, scattered = array[rows], True
        if is_memmap(array):
            self.pages.account(array, mapped_bytes(out, scattered))
        return np.asarray(out)

    def _direct(self, array: np.ndarray) -> bool:
        return is_memmap(array) and array.nbytes > self.budget and hasattr(os, "preadv")

    def _pread(self, ref: MappedFile, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of the C-contiguous array ``ref`` names: one
        ``preadv`` per run of neighbouring rows; runs not in the page cache are hinted to the
        kernel first, all of them, then read."""
        fd = self._descriptor(ref.filename)
        dtype = np.dtype(ref.dtype)
        width = int(np.prod(ref.shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows), *ref.shape[1:]), dtype=dtype)
        view = out.reshape(-1).view(np.uint8).data
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = np.concatenate(([0], cuts)).astype(np.int64)  # each run's first batch row
        sizes = ((np.concatenate((cuts, [len(rows)])) - firsts) * width).tolist()
        offsets = (ref.offset + rows[firsts] * width).tolist()
        starts = (firsts * width).tolist()
        runs = list(zip(offsets, starts, sizes, strict=True))
        if len(runs) > 1 and self.nowait:  # what the page cache holds first, without waiting
            runs = self._cached(fd, view, runs)
        if len(runs) > 1 and hasattr(os, "posix_fadvise"):  # readahead hints, all runs first
            for offset, _, size in runs:
                os.posix_fadvise(fd, offset, size, WILLNEED)
        preadv = os.preadv  # the loop below is the per-row cost of a shuffled batch: keep it lean
        for offset, start, size in runs:
            if preadv(fd, [view[start : start + size]], offset) != size:
                _read_on(fd, view[start : start + size], offset, ref, width)
        return out

    def _cached(
        self, fd: int, view: memoryview, runs: list[tuple[int, int, int]]
    ) -> list[tuple[int, int, int]]:
        """Read the runs (file offset, buffer offset, bytes) the page cache holds, with
        ``RWF_NOWAIT`` (it fails instead of waiting for the disk); return the rest, to be hinted
        and read. A file system without ``RWF_NOWAIT`` turns this step off for the reader."""
        preadv, flags = os.preadv, int(NOWAIT or 0)
        missing: list[tuple[int, int, int]] = []
        for i, (offset, start, size) in enumerate(runs):
            try:
                got = preadv(fd, [view[start : start + size]], offset, flags)
            except BlockingIOError:  # not in the page cache
                got = 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False
                return [*missing, *runs[i:]]
            if got != size:
                missing.append((offset + got, start + got, size - got))
        return missing

    def _descriptor(self, filename: str) -> int:
        key = (os.getpid(), filename)  # a forked worker opens its own
        fd = self._files.get(key)
        if fd is None:
            fd = self._files[key] = os.open(filename, os.O_RDONLY)
            weakref.finalize(self, os.close, fd)
        return fd

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a new process opens its own files
        state.update(pages=PageBudget(self.budget), _files={})
        return state


def _read_on(fd: int, buffer: memoryview, offset: int, ref: MappedFile, width: int) -> None:
    """Read ``buffer`` whole from ``offset`` after a short read (a large run read in parts);
    a file that ends first was truncated or replaced under the map."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            row = (offset + done - ref.offset) // width
            raise DataError(
                [f"'{ref.filename}' ended before row {row}: the file was truncated or replaced"]
            )
        done += got


NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
"""``preadv`` flag (Linux): read only what the page cache holds, fail rather than wait."""

WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)
"""``posix_fadvise`` advice: read these bytes into the page cache now, asynchronously."""


FAULT_AROUND = 64 * 2**10
"""Bytes a page fault may map around the faulting address (Linux's default fault-around)."""


def mapped_bytes(rows: np.ndarray, scattered: bool) -> int:
    """An upper bound of the bytes reading ``rows`` from a map brought into the process: their
    bytes for one contiguous run, a fault-around window per row for scattered rows."""
    if not scattered:
        return int(rows.nbytes) + FAULT_AROUND
    row = int(rows.nbytes) // max(len(rows), 1)
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
