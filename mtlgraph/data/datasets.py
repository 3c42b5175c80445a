"""Datasets and loaders whose batches are ``(X_dict, Y_dict)`` pairs.

``X_dict`` maps field names to inputs; ``Y_dict`` maps *task names* to label tensors. Which tasks
a batch trains is decided by the keys of its ``Y_dict``.

In-memory datasets are batched by slicing every field with an index batch (a view for unshuffled
batches), not by collating per-sample dictionaries: on small models that per-sample work is where
a training step's time goes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtlgraph.exceptions import DataError

Batch = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""A batch: ``(X_dict, Y_dict)``."""

MASK_SUFFIX = "_mask"
"""Suffix of the mask field added for every padded variable-length sequence field."""


def _is_sequence_list(value: list[Any]) -> bool:
    return len(value) > 0 and all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in value)


def pad_sequences(
    seqs: Sequence[torch.Tensor], pad_value: int | float = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors to a ``(B, max_len)`` tensor and a boolean mask (True = real).

    Example:
        >>> import torch
        >>> from mtlgraph.data.datasets import pad_sequences
        >>> padded, mask = pad_sequences([torch.tensor([1, 2, 3]), torch.tensor([4])])
        >>> padded.tolist(), mask.tolist()
        ([[1, 2, 3], [4, 0, 0]], [[True, True, True], [True, False, False]])
    """
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max()) if len(seqs) else 0
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_value)
    if padded.shape[1] < width:  # pragma: no cover - pad_sequence always reaches max length
        padded = torch.nn.functional.pad(padded, (0, width - padded.shape[1]), value=pad_value)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return padded, mask


def collate_dicts(samples: Sequence[Batch], pad_value: int | float = 0) -> Batch:
    """Collate per-sample ``(x_dict, y_dict)`` pairs into one batch.

    Tensors of equal shape are stacked; 1-D tensors of different lengths are padded and get a
    ``<field>_mask`` field; anything else is kept as a list.
    """
    x_out: dict[str, Any] = {}
    y_out: dict[str, torch.Tensor] = {}
    for field in samples[0][0]:
        values = [s[0][field] for s in samples]
        x_out.update(_collate_field(field, values, pad_value))
    for task in samples[0][1]:
        y_out[task] = torch.stack([torch.as_tensor(s[1][task]) for s in samples])
    return x_out, y_out


def _collate_field(field: str, values: list[Any], pad_value: int | float) -> dict[str, Any]:
    if all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            return {field: torch.stack(values)}
        if all(v.ndim == 1 for v in values):
            padded, mask = pad_sequences(values, pad_value)
            return {field: padded, field + MASK_SUFFIX: mask}
    return {field: list(values)}


class DictDataset(Dataset[Batch]):
    """A named split of examples: input fields ``X_dict`` and task labels ``Y_dict``.

    Args:
        name: Dataset name, the second part of score keys (no ``/``).
        split: Split name such as ``"train"``, ``"valid"``, ``"test"`` (no ``/``).
        X_dict: Field name -> tensor ``(N, ...)`` (dtype kept), numpy array (converted with
            ``torch.as_tensor``; floating arrays to torch's default dtype, float32, as the YAML
            path does), list of 1-D tensors (variable-length sequences,
            padded per batch with a ``<field>_mask``), or list of arbitrary objects.
        Y_dict: Task name -> label tensor ``(N,)`` or ``(N, L)`` (or numpy array).

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
        self,
        name: str,
        split: str,
        X_dict: Mapping[str, Any],
        Y_dict: Mapping[str, Any],
    ) -> None:
        problems: list[str] = []
        for what, part in (("name", name), ("split", split)):
            if not isinstance(part, str) or not part or "/" in part:
                problems.append(f"dataset {what} {part!r} must be a non-empty string without '/'")
        who = f"dataset '{name}' ({split})"
        X = _checked_inputs(X_dict, who, problems)
        Y = _checked_labels(Y_dict, who, problems)
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
        self.Y_dict: dict[str, torch.Tensor] = Y
        self._length = next(iter(lengths.values())) if lengths else 0
        self._kinds = {
            k: "tensor"
            if isinstance(v, torch.Tensor)
            else ("seq" if _is_sequence_list(v) else "list")
            for k, v in X.items()
        }

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Batch:
        x = {k: v[index] for k, v in self.X_dict.items()}
        y = {k: v[index] for k, v in self.Y_dict.items()}
        return x, y

    def batch(
        self, index: slice | torch.Tensor | Sequence[int], pad_value: int | float = 0
    ) -> Batch:
        """Return the batch at ``index`` (a slice, or a tensor/list of row indices).

        Tensor fields are sliced (a view for a slice), sequence fields padded with a mask, list
        fields gathered.
        """
        rows: list[int] | None = None
        x: dict[str, Any] = {}
        for field, value in self.X_dict.items():
            kind = self._kinds[field]
            if kind == "tensor":
                x[field] = value[index]
                continue
            if rows is None:
                rows = _rows(index, self._length)
            items = [value[i] for i in rows]
            if kind == "seq":
                padded, mask = pad_sequences(items, pad_value)
                x[field], x[field + MASK_SUFFIX] = padded, mask
            else:
                x[field] = items
        y = {task: labels[index] for task, labels in self.Y_dict.items()}
        return x, y

    def __repr__(self) -> str:
        return (
            f"DictDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"X={list(self.X_dict)}, Y={list(self.Y_dict)})"
        )


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
            if _is_sequence_list(value) and field + MASK_SUFFIX in X_dict:
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
    """Sequential or shuffled order, reproducible from ``(seed, epoch)`` alone.

    The permutation of epoch ``e`` is drawn from a generator seeded with ``seed + e``, so an
    order can be recomputed on resume and on every DDP rank without global random state.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def order(self) -> torch.Tensor | None:
        """This epoch's permutation, or ``None`` for sequential order."""
        if not self.shuffle:
            return None
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        perm = self.order()
        return iter(range(self.n)) if perm is None else iter(perm.tolist())

    def __len__(self) -> int:
        return self.n


class DictDataLoader(DataLoader[Batch]):
    """A ``torch.utils.data.DataLoader`` over a :class:`DictDataset` yielding ``(X_dict, Y_dict)``.

    With ``num_workers=0`` and the default collate function, batches are cut from the
    in-memory tensors directly (slices for unshuffled loaders), which keeps small-model training
    fast; other settings use PyTorch's own loading machinery with :func:`collate_dicts`.

    Args:
        dataset: The dataset to load.
        batch_size: Examples per batch.
        shuffle: Reshuffle each epoch (call :meth:`set_epoch`; the Trainer does).
        seed: Seed of the shuffling order (order of epoch ``e`` uses ``seed + e``).
        drop_last: Drop the last incomplete batch.
        **kwargs: Any other ``DataLoader`` argument (``num_workers``, ``sampler``, ``pin_memory``,
            ``collate_fn``...).

    Example:
        >>> import torch
        >>> from mtlgraph import DictDataset, DictDataLoader
        >>> ds = DictDataset("d", "train", {"x": torch.arange(5.0)[:, None]},
        ...                  {"t": torch.tensor([0, 1, 0, 1, 0])})
        >>> [y["t"].tolist() for _, y in DictDataLoader(ds, batch_size=2)]
        [[0, 1], [0, 1], [0]]
    """

    dataset: DictDataset

    def __init__(
        self,
        dataset: DictDataset,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, DictDataset):
            raise DataError([f"DictDataLoader needs a DictDataset, got {type(dataset).__name__}"])
        if "sampler" not in kwargs and "batch_sampler" not in kwargs:
            kwargs["sampler"] = EpochSampler(len(dataset), shuffle, seed)
        elif shuffle:
            raise DataError(["shuffle=True cannot be combined with a custom sampler"])
        self._default_collate = "collate_fn" not in kwargs
        kwargs.setdefault("collate_fn", collate_dicts)
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the sampler (shuffling order; ``DistributedSampler`` too)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Iterate over this epoch's batches, beginning at batch number ``start``.

        Skipping is free on the in-memory path (the batch order is known in advance).
        """
        if self.num_workers > 0 or not self._default_collate or self.batch_size is None:
            it = super().__iter__()
            for _ in range(start):
                next(it)
            return it
        return self._slice_iter(start)

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
        for begin in range(start * bs, stop, bs):
            end = min(begin + bs, n)
            yield self.dataset.batch(slice(begin, end) if perm is None else perm[begin:end])
