"""What a batch is and how examples become one: :data:`Batch`, :func:`collate_dicts`,
:func:`pad_sequences`, and :class:`RowBatch` (a batch a dataset reads in one call).
Every dataset kind (in-memory, named, streamed, prediction) shares these rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, overload

import torch
from torch.utils.data import default_collate

Batch = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""A batch: ``(X_dict, Y_dict)``."""

MASK_SUFFIX = "_mask"
"""Suffix of the mask field added for every padded variable-length sequence field."""


def is_sequence_list(value: list[Any]) -> bool:
    """True for a non-empty list of 1-D tensors (a variable-length field, padded per batch)."""
    return len(value) > 0 and all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in value)


def pad_sequences(
    seqs: Sequence[torch.Tensor], pad_value: int | float = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors to a ``(B, max_len)`` tensor and a boolean mask (True = real).

    Example:
        >>> import torch
        >>> from mtlgraph.data import pad_sequences
        >>> padded, mask = pad_sequences([torch.tensor([1, 2, 3]), torch.tensor([4])])
        >>> padded.tolist(), mask.tolist()
        ([[1, 2, 3], [4, 0, 0]], [[True, True, True], [True, False, False]])
    """
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max()) if len(seqs) else 0
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_value)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return padded, mask


class BatchReader(Protocol):
    """A dataset that reads a batch of rows in one call (as :class:`~mtlgraph.DictDataset`)."""

    def __getitem__(self, index: int) -> Any: ...

    def batch(self, index: torch.Tensor | slice, pad_value: int | float = 0) -> Batch: ...


class RowBatch(Sequence[Any]):
    """Rows ``indices`` of ``dataset``, in that order: what ``DictDataset.__getitems__`` returns
    to a ``DataLoader`` worker.

    :func:`collate_dicts` reads it whole with ``dataset.batch(indices)`` (a run of indices as a
    slice); any other collate function sees a sequence of per-row examples.

    Example:
        >>> import torch
        >>> from mtlgraph import DictDataset
        >>> from mtlgraph.data import collate_dicts
        >>> ds = DictDataset("d", "train", {"x": torch.arange(6.0)[:, None]},
        ...                  {"t": torch.arange(6)})
        >>> rows = ds.__getitems__([4, 1, 2])
        >>> len(rows), rows[0][1]["t"].item(), collate_dicts(rows)[1]["t"].tolist()
        (3, 4, [4, 1, 2])
    """

    def __init__(self, dataset: BatchReader, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def read(self, pad_value: int | float = 0) -> Batch:
        """The whole batch, rows in the order of :attr:`indices` (a small one pickled by value,
        see :class:`SmallBatch`)."""
        idx = self.indices
        if idx and idx[0] >= 0 and idx == list(range(idx[0], idx[0] + len(idx))):
            batch = self.dataset.batch(slice(idx[0], idx[0] + len(idx)), pad_value)
        else:
            batch = self.dataset.batch(torch.tensor(idx, dtype=torch.long), pad_value)
        return SmallBatch.of(batch)

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.dataset[j] for j in self.indices[i]]
        return self.dataset[self.indices[i]]


BY_VALUE_BYTES = 512 * 2**10
"""Tensor bytes up to which a worker's batch travels to the loader pickled by value (512 KiB)."""


class SmallBatch(tuple[dict[str, Any], dict[str, Any]]):
    """A batch whose tensors travel by value when pickled (to the loader's process).

    Shared memory costs a connection and a mapping per tensor; a small batch is cheaper through
    the pipe. It unpickles as a plain ``(X_dict, Y_dict)`` of tensors, equal to the one sent.

    Example:
        >>> import pickle, torch
        >>> from mtlgraph.data.collate import SmallBatch
        >>> batch = SmallBatch.of(({"x": torch.ones(2, 3)}, {"t": torch.tensor([0, 1])}))
        >>> x, y = pickle.loads(pickle.dumps(batch))
        >>> type(x["x"]).__name__, y["t"].tolist()
        ('Tensor', [0, 1])
    """

    @classmethod
    def of(cls, batch: Batch) -> Batch:
        """``batch`` as a :class:`SmallBatch` when its tensors (CPU, numpy dtypes) total at most
        :data:`BY_VALUE_BYTES`; otherwise ``batch`` itself."""
        tensors = [v for part in batch for v in part.values() if isinstance(v, torch.Tensor)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > BY_VALUE_BYTES or not all(_numpy_ready(t) for t in tensors):
            return batch
        return cls(batch)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        x, y = self
        return _from_arrays, (_to_arrays(x), _to_arrays(y))


def _numpy_ready(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not t.requires_grad and t.dtype not in _NO_NUMPY


_NO_NUMPY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


class _Array(NamedTuple):
    """A tensor's data in a pickled :class:`SmallBatch` (a list field stays a list)."""

    array: Any  # numpy.ndarray


def _to_arrays(part: dict[str, Any]) -> dict[str, Any]:
    return {k: _Array(v.numpy()) if isinstance(v, torch.Tensor) else v for k, v in part.items()}


def _from_arrays(x: dict[str, Any], y: dict[str, Any]) -> Batch:
    def back(part: dict[str, Any]) -> dict[str, Any]:
        return {
            k: torch.from_numpy(v.array) if isinstance(v, _Array) else v for k, v in part.items()
        }

    return back(x), back(y)


def collate_dicts(samples: Sequence[Any], pad_value: int | float = 0) -> Batch:
    """Collate per-sample ``(x_dict, y_dict)`` pairs into one batch (a :class:`RowBatch` is read
    whole): equal shapes stacked, 1-D tensors of different lengths padded with a
    ``<field>_mask`` (True = real), anything else kept as a list.

    Example:
        >>> import torch
        >>> from mtlgraph.data import collate_dicts
        >>> x, y = collate_dicts([({"a": torch.tensor([1, 2])}, {"t": 0}),
        ...                       ({"a": torch.tensor([3])}, {"t": 1})])
        >>> x["a"].tolist(), x["a_mask"].tolist(), y["t"].tolist()
        ([[1, 2], [3, 0]], [[True, True], [True, False]], [0, 1])
    """
    if isinstance(samples, RowBatch):
        return samples.read(pad_value)
    x_out: dict[str, Any] = {}
    y_out: dict[str, torch.Tensor] = {}
    for field in samples[0][0]:
        values = [s[0][field] for s in samples]
        x_out.update(_collate_field(field, values, pad_value))
    for task in samples[0][1]:
        y_out[task] = default_collate([torch.as_tensor(s[1][task]) for s in samples])
    return x_out, y_out


def _collate_field(field: str, values: list[Any], pad_value: int | float) -> dict[str, Any]:
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            return {field: default_collate(values)}  # in a worker: stacked in shared memory
        if all(v.ndim == 1 for v in values):
            padded, mask = pad_sequences(values, pad_value)
            return {field: padded, field + MASK_SUFFIX: mask}
    return {field: list(values)}
