"""Memory-mapped numpy arrays as dataset fields: read a batch's rows, never the whole array.

``DictDataset`` keeps a ``numpy.memmap`` field (``np.load(path, mmap_mode="r")``) as it is; a
batch reads only its rows (:func:`gather`): a slice is one contiguous read, a shuffled batch's
rows are read in sorted order (sequential disk access) and put back in the batch's order, and
only the batch becomes a tensor. The pages a read brings in count towards the process's resident
memory until the kernel drops them; :class:`PageBudget` tells the kernel to drop them (they stay
in the page cache) after every ``budget`` bytes read, so resident memory stays bounded however
large the file.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_BUDGET = 256 * 2**20
"""Bytes read from a map between two releases of its pages (256 MiB)."""


def is_memmap(value: object) -> bool:
    """True for a ``numpy.memmap`` (what ``np.load(path, mmap_mode=...)`` returns)."""
    return isinstance(value, np.memmap)


def gather(array: np.ndarray, index: slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Rows ``index`` of ``array`` as a new tensor (a shuffled index is read in sorted order).

    Example:
        >>> import numpy as np, torch
        >>> from mtlgraph.data.memmap import gather
        >>> gather(np.arange(10.0), torch.tensor([7, 2, 5])).tolist()
        [7.0, 2.0, 5.0]
    """
    if isinstance(index, slice):
        rows = np.array(array[index])
    else:
        idx = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        order = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx), *array.shape[1:]), dtype=array.dtype)
        rows[order] = array[idx[order]]
    return torch.from_numpy(rows)


class PageBudget:
    """Drops a memory map's resident pages after every ``budget`` bytes read from it."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.read: dict[int, int] = {}

    def account(self, array: Any, nbytes: int) -> None:
        """``nbytes`` were read from ``array``; release its pages when over budget."""
        handle = getattr(array, "_mmap", None)
        if handle is None:
            return
        key = id(handle)
        self.read[key] = self.read.get(key, 0) + nbytes
        if self.read[key] >= self.budget:
            self.read[key] = 0
            release(handle)

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget, "read": {}}


def release(handle: Any) -> None:
    """Tell the kernel this process no longer needs the map's pages (a no-op where the
    platform has no ``madvise``)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None and hasattr(handle, "madvise"):
        handle.madvise(advice)
