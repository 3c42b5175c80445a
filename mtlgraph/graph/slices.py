"""Slice functions: named subsets of a dataset's rows, scored on their own under keys whose
dataset part is ``<dataset>:<slice>`` (so ``:`` is not allowed in dataset or slice names); a slice
with no row reports NaN. See ``docs/training.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.registry import Registry

SliceFunc = Callable[[Mapping[str, Any]], Any]
"""``fn(X_dict) -> one boolean per row``."""

SLICE_SEP = ":"
"""Separates a dataset and a slice in the dataset part of a score key."""


def _check_slice(name: str, func: Any) -> list[str]:
    problems = []
    if SLICE_SEP in name:
        problems.append(f"slice name '{name}' must not contain '{SLICE_SEP}'")
    if not callable(func):
        problems.append(f"slice '{name}': {func!r} is not callable")
    return problems


SLICES: Registry[SliceFunc] = Registry("slice function", check=_check_slice)
"""Slice functions by name; ``SLICES.register(name, func)`` adds one, ``SLICES.unregister``
removes it.

Example:
    >>> from mtlgraph.graph.slices import SLICES
    >>> def far(X):
    ...     return X["circle_data"].norm(dim=1) > 1
    >>> SLICES.register("far_doc", far) is far
    True
    >>> SLICES.unregister("far_doc") is far
    True
"""


def resolve_slices(slices: Mapping[str, SliceFunc] | Sequence[str] | None) -> dict[str, SliceFunc]:
    """``{name: fn}`` from a mapping of functions or a list of registered names.

    Raises:
        ConfigError: Unknown names (with a suggestion), names with ``/`` or ``:``, values that
            are not callable; all at once.
    """
    if not slices:
        return {}
    names = list(slices)
    found: Registry[SliceFunc] = Registry("slice function", check=_check_slice)
    problems: list[str] = []
    for name in names:
        try:  # the registry's name rules, _check_slice's, and SLICES' unknown names
            found.register(name, slices[name] if isinstance(slices, Mapping) else SLICES.get(name))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems, header="invalid slices:" if len(problems) > 1 else None)
    return {name: found.get(name) for name in names}


def slice_mask(name: str, func: SliceFunc, X: Mapping[str, Any], n_rows: int, where: str) -> Any:
    """Call slice ``name`` on one batch and check its answer: one boolean per row.

    Args:
        name: The slice's name (for messages).
        func: The slice function.
        X: The batch's ``X_dict``.
        n_rows: Rows in the batch.
        where: Names the dataset and split (for messages).

    Returns:
        A boolean numpy array of length ``n_rows``.

    Raises:
        DataError: The answer is not booleans (say, 0/1 integers or scores), or not one per row.
    """
    try:
        out = func(X)
    except Exception as e:
        e.add_note(f"mtlgraph: raised by slice function '{name}' on {where}")
        raise
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    mask = np.asarray(out)
    problem = None
    if mask.dtype != np.bool_:
        problem = (
            f"returned {mask.dtype} values; it must return booleans (write e.g. "
            "`(X['f'] > 0)`, or `.bool()` a 0/1 tensor)"
        )
    elif mask.shape != (n_rows,):
        problem = f"returned shape {mask.shape} for a batch of {n_rows} rows; it needs ({n_rows},)"
    if problem is not None:
        raise DataError([f"slice function '{name}' on {where} {problem}"])
    return mask


def check_slices(slices: Mapping[str, SliceFunc] | Sequence[str], loaders: Sequence[Any]) -> None:
    """Run every slice function on the first rows of every loader's dataset, so that a slice
    function returning the wrong thing fails before training, not at the first evaluation.

    Raises:
        ConfigError: Unknown or malformed slice names.
        DataError: A slice function that does not return one boolean per row.
    """
    funcs = resolve_slices(slices)
    for loader in loaders if funcs else []:
        ds = getattr(loader, "dataset", None)
        if ds is None or not hasattr(ds, "batch") or len(ds) == 0:
            continue
        n = min(len(ds), 4)
        X, _ = ds.batch(slice(0, n))
        for name, fn in funcs.items():
            slice_mask(name, fn, X, n, f"dataset '{ds.name}' ({ds.split})")
