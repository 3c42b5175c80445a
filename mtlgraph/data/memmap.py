"""Memory-mapped numpy arrays as dataset fields: read a batch's rows, never the whole array.

A ``DictDataset`` keeps a ``numpy.memmap`` field as it is and reads a batch's rows through its
:class:`MapReader`; a copy sent to another process carries a :class:`MappedFile` reference per
map, never the data. docs/data.md ("Memory behaviour") describes the reads and the memory bound.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading
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

    A C-contiguous map larger than ``budget`` is read from its file: the batch's distinct rows
    in file order, neighbouring rows as one read (what the page cache holds in one system call,
    :class:`BatchedReads`, where Linux offers it), then returned in the batch's order; any
    other map is indexed with numpy under a :class:`PageBudget` (docs/data.md, "Memory
    behaviour").

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
        self.batched = BatchedReads.supported()  # those reads in one system call (Linux AIO)
        self._batched: tuple[int, BatchedReads] | None = None  # (process id, its context)
        self._refs: dict[int, tuple[np.ndarray, MappedFile | None]] = {}  # see _reference

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
        ref = self._reference(array)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self.gather(array, range(start, stop, step))
            rows = np.arange(start, max(start, stop))
            if ref is not None:
                return torch.from_numpy(self._pread(ref, rows))
            return torch.from_numpy(self._indexed(array, slice(start, max(start, stop)), rows))
        idx = np.asarray(index.numpy() if isinstance(index, torch.Tensor) else index, np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        if ref is None:  # numpy indexes in any order, duplicates included
            return torch.from_numpy(self._indexed(array, idx, idx))
        rows, where = np.unique(idx, return_inverse=True)  # ascending, each row once
        block = self._pread(ref, rows)
        if len(rows) == len(idx) and bool((rows == idx).all()):
            return torch.from_numpy(block)
        return torch.from_numpy(block[where])  # the batch's order, duplicates restored

    def _reference(self, array: np.ndarray) -> MappedFile | None:
        """The file ``array`` is read from, or ``None`` (numpy indexes it): a C-contiguous map
        larger than the budget. Kept per array (the last few arrays)."""
        key = id(array)
        known = self._refs.get(key)
        if known is not None and known[0] is array:
            return known[1]
        ref = None
        if is_memmap(array) and array.nbytes > self.budget and hasattr(os, "preadv"):
            found = reference(array)
            ref = found if isinstance(found, MappedFile) else None
        if len(self._refs) >= 16:  # a caller gathering from fresh views: keep none alive long
            self._refs.clear()
        self._refs[key] = (array, ref)
        return ref

    def _indexed(
        self, array: np.ndarray, index: slice | np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """``array[index]`` as a new array (``rows``: the row numbers it reads); the pages a
        memory map brings in are counted against the :class:`PageBudget`."""
        if is_memmap(array):
            self.check_size(array)
        out = np.array(array[index]) if isinstance(index, slice) else np.asarray(array[index])
        if is_memmap(array):
            one_run = len(rows) > 0 and int(rows.max()) - int(rows.min()) + 1 == len(rows)
            self.pages.account(array, mapped_bytes(out, scattered=not one_run))
        return out

    def _pread(self, ref: MappedFile, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct) of the C-contiguous array ``ref`` names, a read
        per run of neighbouring rows: what the page cache holds first, in one system call
        (:class:`BatchedReads`) or one ``preadv`` a run; the runs left are hinted to the kernel,
        all of them, then read."""
        fd = self._descriptor(ref.filename)
        dtype = np.dtype(ref.dtype)
        width = int(np.prod(ref.shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows), *ref.shape[1:]), dtype=dtype)
        view = out.reshape(-1).view(np.uint8).data
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts = np.concatenate(([0], cuts)).astype(np.int64)  # each run's first batch row
        sizes = (np.concatenate((cuts, [len(rows)])) - firsts) * width
        offsets, starts = ref.offset + rows[firsts] * width, firsts * width
        left: tuple[np.ndarray, ...] | None = None
        batch = self._batch() if len(sizes) > 1 and self.batched else None
        if batch is not None:
            left = batch.read(fd, out.ctypes.data, offsets, starts, sizes)
            self.batched = left is not None  # refused here: one read a run from now on
        if left is not None:
            offsets, starts, sizes = left
        runs = list(zip(offsets.tolist(), starts.tolist(), sizes.tolist(), strict=True))
        if left is None and len(runs) > 1 and self.nowait:  # the page cache's runs, no waiting
            runs = self._cached(fd, view, runs)
        if len(runs) > 1 and hasattr(os, "posix_fadvise"):  # readahead hints, all runs first
            for offset, _, size in runs:
                os.posix_fadvise(fd, offset, size, WILLNEED)
        preadv = os.preadv  # the loop below is the per-row cost of a shuffled batch: keep it lean
        for offset, start, size in runs:
            if preadv(fd, [view[start : start + size]], offset) != size:
                _read_on(fd, view[start : start + size], offset, ref, width)
        return out

    def _batch(self) -> BatchedReads | None:
        """This process's :class:`BatchedReads` (a forked worker sets up its own), or ``None``
        where the kernel gives no AIO context (then this reader reads one run at a time)."""
        pid = os.getpid()
        if self._batched is None or self._batched[0] != pid:
            try:
                self._batched = (pid, BatchedReads())
            except OSError as e:  # out of contexts (fs.aio-max-nr), or AIO not permitted here
                if e.errno not in (errno.EAGAIN, errno.ENOSYS, errno.EPERM, errno.EINVAL):
                    raise
                self.batched = False
                return None
        return self._batched[1]

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

    def check_size(self, array: np.ndarray) -> None:
        """Refuse to index a map whose file is now shorter than the map (touching a page past
        the end of a file kills the process with SIGBUS): one ``fstat`` per batch.

        Raises:
            DataError: The file was truncated under the map, naming it and the rows lost.
        """
        root: Any = array
        while isinstance(root.base, np.memmap):
            root = root.base
        filename = getattr(root, "filename", None)
        if filename is None:
            return
        end = int(root.offset) + int(root.nbytes)  # the map's last byte in the file
        try:
            size = os.fstat(self._descriptor(str(filename))).st_size
        except FileNotFoundError:  # unlinked before its first read: the map keeps the data
            return
        if size < end:
            width = max(int(root.nbytes) // max(len(root), 1), 1)
            row = max(size - int(root.offset), 0) // width
            raise DataError(
                [
                    f"'{filename}' is {size} bytes, but its memory map needs {end}: the file was "
                    f"truncated or replaced while it was read (rows from {row} on are gone); "
                    "restore the file and train again (or resume from the last checkpoint)"
                ]
            )

    def _descriptor(self, filename: str) -> int:
        key = (os.getpid(), filename)  # a forked worker opens its own
        fd = self._files.get(key)
        if fd is None:
            fd = self._files[key] = os.open(filename, os.O_RDONLY)
            weakref.finalize(self, os.close, fd)
        return fd

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a new process opens its own files
        state.update(pages=PageBudget(self.budget), _files={}, _batched=None, _refs={})
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


_AIO_CALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
"""Linux system call numbers: ``io_setup``, ``io_destroy``, ``io_getevents``, ``io_submit``."""

_IOCB = np.dtype(
    [
        ("data", "<u8"),
        ("key", "<u4"),
        ("rw_flags", "<i4"),
        ("opcode", "<u2"),
        ("reqprio", "<i2"),
        ("fd", "<u4"),
        ("buf", "<u8"),
        ("nbytes", "<u8"),
        ("offset", "<i8"),
        ("reserved", "<u8"),
        ("flags", "<u4"),
        ("resfd", "<u4"),
    ]
)
"""``struct iocb`` of ``linux/aio_abi.h`` (little-endian); opcode 0 is ``IOCB_CMD_PREAD``."""

_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
"""``struct io_event``: ``res`` is the bytes read, or minus the error number."""


class BatchedReads:
    """Many reads in one system call: a Linux AIO context (``io_submit``) whose reads carry
    ``RWF_NOWAIT``, so the kernel copies what the page cache holds, at once, and refuses the
    rest (``EAGAIN``) instead of reading the disk one run after another.

    A shuffled batch of small rows is hundreds of scattered reads; one ``preadv`` each costs a
    system call and a Python call a row, about twice the kernel's own copy. Created per
    process (an AIO context belongs to the process that set it up).

    Example:
        >>> import os, tempfile, numpy as np
        >>> from mtlgraph.data.memmap import BatchedReads
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.bin")
        >>> np.arange(8, dtype=np.int64).tofile(path)
        >>> fd = os.open(path, os.O_RDONLY)
        >>> out = np.zeros(2, np.int64)
        >>> if BatchedReads.supported():  # elsewhere MapReader reads a run at a time
        ...     left = BatchedReads().read(fd, out.ctypes.data, np.array([48, 8]),
        ...                                np.array([0, 8]), np.array([8, 8]))
        ...     assert out.tolist() == [6, 1] and [len(part) for part in left] == [0, 0, 0]
        >>> os.close(fd)
    """

    CAPACITY = 1024
    """Reads submitted at once (a larger batch is submitted in parts)."""

    def __init__(self) -> None:
        self.calls = _AIO_CALLS[platform.machine()]
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long
        context = ctypes.c_ulong(0)
        if self._call(0, self.CAPACITY, ctypes.byref(context)) < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"io_setup: {os.strerror(error)}")
        self.context = ctypes.c_ulong(context.value)
        weakref.finalize(self, self._call, 1, self.context)
        self.iocbs = np.zeros(self.CAPACITY, _IOCB)
        self.iocbs["rw_flags"] = int(NOWAIT or 0)
        self.iocbs["data"] = np.arange(self.CAPACITY)
        self.pointers = self.iocbs.ctypes.data + np.arange(self.CAPACITY) * _IOCB.itemsize
        self.events = np.zeros(self.CAPACITY, _EVENT)
        self._lock = threading.Lock()  # one batch at a time: the arrays above are shared

    @staticmethod
    def supported() -> bool:
        """Linux on x86-64 or ARM64 with ``RWF_NOWAIT`` (Python 3.7+)."""
        machine = platform.machine()
        return sys.platform == "linux" and machine in _AIO_CALLS and NOWAIT is not None

    def _call(self, which: int, *args: Any) -> int:
        """System call ``which`` (an index into :data:`_AIO_CALLS`) with ``args``."""
        return int(self._syscall(ctypes.c_long(self.calls[which]), *args))

    def read(
        self,
        fd: int,
        address: int,
        offsets: np.ndarray,
        starts: np.ndarray,
        sizes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Read run ``i`` (``sizes[i]`` bytes at file offset ``offsets[i]``) to ``address +
        starts[i]`` where the page cache holds it; return the runs (or their rest) still to
        read, as ``(offsets, starts, sizes)``, or ``None`` where the kernel refuses batched
        reads here (nothing was read: read every run another way)."""
        got = np.zeros(len(sizes), np.int64)
        for first in range(0, len(sizes), self.CAPACITY):
            part = slice(first, min(len(sizes), first + self.CAPACITY))
            with self._lock:
                done = self._submit(fd, address, offsets[part], starts[part], sizes[part])
            if done is None:
                return None
            got[part] = done
        keep = got < sizes  # not cached (EAGAIN), an error, or a short read: read it again
        return offsets[keep] + got[keep], starts[keep] + got[keep], sizes[keep] - got[keep]

    def _submit(
        self, fd: int, address: int, offsets: np.ndarray, starts: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray | None:
        """Bytes read of each run (0 where a run failed or was not submitted), or ``None``."""
        n = len(sizes)
        iocbs = self.iocbs[:n]
        iocbs["fd"], iocbs["buf"] = fd, address + starts
        iocbs["nbytes"], iocbs["offset"] = sizes, offsets
        pointers = ctypes.c_void_p(self.pointers.ctypes.data)
        submitted = self._call(3, self.context, ctypes.c_long(n), pointers)
        if submitted < 0:
            error = ctypes.get_errno()
            if error in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise OSError(error, f"io_submit: {os.strerror(error)}")
        got = np.zeros(n, np.int64)  # a run the kernel did not take (submitted < n) reads 0
        reaped, refused = 0, False
        while reaped < submitted:
            want = ctypes.c_long(submitted - reaped)
            events = ctypes.c_void_p(self.events.ctypes.data)
            count = self._call(2, self.context, want, want, events, None)
            if count < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    continue
                raise OSError(error, f"io_getevents: {os.strerror(error)}")
            done = self.events[:count]
            got[done["data"].astype(np.int64)] = np.maximum(done["res"], 0)
            failed = done["res"][done["res"] < 0]
            refused |= bool(len(failed)) and bool(
                ((failed == -errno.EOPNOTSUPP) | (failed == -errno.EINVAL)).any()
            )
            reaped += count
        return None if refused else got  # refused: this file system takes no RWF_NOWAIT reads


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
