"""Columns -> tensors and datasets: the meaning of a table's cells.

A :class:`~mtlgraph.data.sources.files.Table` (read by :mod:`mtlgraph.data.sources.files`)
becomes input fields and labels here, with the same rules for training and prediction
(``docs/data-sources.md`` gives the rules); :func:`table_dataset` gives a
:class:`~mtlgraph.DictDataset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataset
from mtlgraph.data.memmap import is_memmap
from mtlgraph.data.sources.files import Table, as_table, select_columns, table_length
from mtlgraph.exceptions import DataError

Tokenizer = Callable[[str], Any]
"""Text -> a sequence of ids (a 1-D tensor or a list of ints)."""

DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}
"""How :func:`split_table` cuts a table without a split column or fractions."""

_BLOCK = 1 << 20  # rows checked at a time in a memory-mapped array


def _number(cell: Any) -> float | np.ndarray:
    """One cell as a number (``nan`` when empty) or, for a list, an array of numbers."""
    if cell is None:
        return math.nan
    if isinstance(cell, (bool, int, float, np.number)):  # JSON true/false: 1 and 0
        return float(cell)
    if isinstance(cell, str):
        text = cell.strip()
        if text.startswith("["):
            return np.asarray(json.loads(text), dtype=np.float64)
        return float(text) if text else math.nan
    return np.asarray(cell, dtype=np.float64)


def numbers(table: Table, column: str, what: str) -> np.ndarray:
    """A column as numbers: text is parsed (empty cells are NaN), list cells become rows of an
    ``(N, k)`` array, numbers are kept.

    Raises:
        DataError: A cell that is not a number (or list cells of different lengths), naming the
            file, the line and the column.
    """
    values = table[column]
    if values.dtype.kind in "biuf":
        return values
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError):
        pass
    cells: list[float | np.ndarray] = []
    for i, cell in enumerate(values):
        try:
            cells.append(_number(cell))
        except (TypeError, ValueError):
            raise DataError([_not_a_number(table, i, column, cell, what)]) from None
    shapes = [np.shape(c) for c in cells]
    if any(s != shapes[0] for s in shapes):
        i = next(i for i, s in enumerate(shapes) if s != shapes[0])
        raise DataError(
            [
                f"{table.place(i)}, column '{column}': {np.size(cells[i])} "
                f"value(s), but {table.place(0)} has {np.size(cells[0])}; every "
                "row of a column needs the same number of values"
            ]
        )
    return np.asarray(cells, dtype=np.float64)


def _not_a_number(table: Table, i: int, column: str, cell: Any, what: str) -> str:
    """The message for a cell that is not a number; a cell over several lines of a CSV file
    is a quote left open further up the row."""
    lines = cell.count("\n") + 1 if isinstance(cell, str) else 1
    shown = repr(cell) if len(repr(cell)) <= 60 else f"{repr(cell)[:50]}...'"
    if lines > 1:
        return (
            f"{table.place(i)}, column '{column}': {shown} is not a number: the cell runs over "
            f'{lines} lines inside quotes, so a quote (") opened in it is probably unbalanced '
            '(double a quote inside a quoted cell: "")'
        )
    return (
        f"{table.place(i)}, column '{column}': {shown} is not a number; {what} needs numbers "
        "(declare the column under 'text' to tokenise it)"
    )


def _first_not_finite(values: np.ndarray) -> int | None:
    if values.dtype.kind != "f":
        return None
    for start in range(0, len(values), _BLOCK):
        block = np.asarray(values[start : start + _BLOCK])
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def input_numbers(table: Table, column: str) -> np.ndarray:
    """A numeric input column: every cell a finite number.

    Raises:
        DataError: A cell that is empty, NaN, infinite or not a number, naming the file, the
            line and the column.
    """
    values = numbers(table, column, "an input field")
    i = _first_not_finite(values)
    if i is not None:
        cell = table[column][i]
        cell = cell.item() if isinstance(cell, np.generic) else cell
        if isinstance(cell, np.ndarray):
            shown = f"{cell.tolist()} is not a finite number"
        elif isinstance(cell, float) and math.isnan(cell):
            shown = "empty or NaN"
        else:
            shown = f"{cell!r} is not a finite number"
        raise DataError(
            [
                f"{table.place(i)}, column '{column}': {shown}; every row of a numeric input "
                "field needs a finite number (fill the cell or remove the row; only labels may "
                "be empty)"
            ]
        )
    return values


def encode_texts(table: Table, column: str, tokenizer: Tokenizer) -> list[torch.Tensor]:
    """Each cell's ids as a 1-D ``int64`` tensor (missing cells are empty texts)."""
    out = []
    for i, cell in enumerate(table[column]):
        text = "" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else str(cell)
        try:
            ids = tokenizer(text)
        except Exception as e:
            e.add_note(f"mtlgraph: while tokenising {table.place(i)}, column '{column}'")
            raise
        out.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
    return out


def field_values(
    table: Mapping[str, np.ndarray],
    columns: str | Sequence[str],
    origin: str = "the table",
    text: Mapping[str, Tokenizer] | None = None,
    finite: bool = True,
) -> Any:
    """One input field from its column(s).

    A tokenised text column gives a list of 1-D id tensors. Numbers give a tensor: ``float32``
    ``(N, 1)`` for one column (``(N, k)`` for list cells or ``k`` columns); the arrays of an
    ``.npz`` file, a ``.npy`` directory or a generator keep their shape and integer dtype, and a
    memory-mapped ``float32`` array stays mapped (a batch reads only its rows).

    ``finite=False`` lets empty, NaN and infinite cells through as NaN and infinities
    (``mtlgraph predict --allow-missing`` answers such rows with nulls).

    Raises:
        DataError: An absent column, a cell that is not a finite number (file, line, column).
    """
    t = as_table(table, origin)
    listed = [columns] if isinstance(columns, str) else list(columns)
    select_columns(list(t), listed, t.origin)
    text = text or {}
    if isinstance(columns, str) and columns in text:
        return encode_texts(t, columns, text[columns])
    tokenised = [c for c in listed if c in text]
    if tokenised:
        raise DataError([f"text column '{tokenised[0]}' must be a field of its own"])
    arrays = [input_numbers(t, c) if finite else numbers(t, c, "an input field") for c in listed]
    if t.typed and isinstance(columns, str):
        array = arrays[0]
        _check_integer_field(array, t.origin, columns)
        if is_memmap(array):
            if array.dtype.kind == "f" and array.dtype != np.float32:
                raise DataError(
                    [
                        f"{t.origin}, column '{columns}': the memory-mapped array is "
                        f"{array.dtype}; mapped arrays are read as stored, so save it as "
                        "float32: np.save(path, array.astype(np.float32))"
                    ]
                )
            return array
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        return torch.from_numpy(np.require(array, requirements=["C", "W"]))
    matrix = np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1) if arrays else None
    if matrix is None:
        return torch.zeros((table_length(t), 0))
    return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))


ID_DTYPES = ("int64", "int32")
"""Integer dtypes an input field keeps (ids, e.g. for an embedding); other integer and boolean
arrays are refused with the cast to write (numbers are features: ``float32``)."""


def _check_integer_field(array: np.ndarray, origin: str, column: str) -> None:
    """Refuse an input array of a small integer or boolean dtype, which no module reads.

    Raises:
        DataError: Naming the column, its dtype and the cast to write.
    """
    if array.dtype.kind not in "biu" or array.dtype.name in ID_DTYPES:
        return
    raise DataError(
        [
            f"{origin}, column '{column}': the array is {array.dtype.name}; an input field is "
            f"float32 (features) or int64 (ids, e.g. for an embedding): save it cast, "
            f"{column}.astype(np.float32) for features or {column}.astype(np.int64) for ids"
        ]
    )


def label_values(table: Mapping[str, np.ndarray], column: str, origin: str = "the table") -> Any:
    """A label column: ``int64`` when every value is a whole number, else ``float32`` (an empty
    cell is NaN: unlabelled)."""
    t = as_table(table, origin)
    select_columns(list(t), [column], t.origin)
    values = numbers(t, column, "a label")
    if t.typed:  # arrays keep their dtype (float (N, C) soft labels stay floats)
        return torch.from_numpy(np.require(values, requirements=["C", "W"]))
    whole = values.dtype.kind in "biu" or bool(
        np.all(np.isfinite(values))
        and np.all(values == np.round(values))
        and np.all(np.abs(values) <= CLASS_ID_LIMIT)  # beyond: kept a float, refused as a class
    )
    return torch.from_numpy(np.ascontiguousarray(values.astype(np.int64 if whole else np.float32)))


CLASS_ID_LIMIT = 2**31 - 1
"""The largest whole number a label column reads as a class id (a larger one stays a float:
a regression target, or an error naming it for a classification task)."""


def split_table(
    table: Mapping[str, np.ndarray],
    split_column: str | None = None,
    fractions: Mapping[str, float] | None = None,
    origin: str = "the table",
) -> dict[str, Table]:
    """Cut a table into splits: by the values of ``split_column``, else by ``fractions`` in row
    order (default 80/10/10 % train/valid/test). Each part keeps its rows' lines."""
    t = as_table(table, origin)
    if split_column is not None:
        if split_column not in t:
            raise DataError(
                [
                    f"{t.origin} has no split column '{split_column}'"
                    f"{did_you_mean(split_column, t)}; it has {quoted(t)}"
                ]
            )
        labels = np.asarray(
            ["" if v is None or v != v else str(v).strip() for v in t[split_column]]
        )
        empty = np.flatnonzero(labels == "")
        if len(empty):
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise DataError(
                [
                    f"{t.place(int(empty[0]))}, column '{split_column}': an empty split name"
                    f"{more}; every row needs its split (e.g. train, valid, test): fill the "
                    "cell, or remove the row"
                ]
            )
        return {s: t.take(labels == s) for s in dict.fromkeys(labels.tolist())}
    n = table_length(t)
    out: dict[str, Table] = {}
    start = 0
    for s, fraction in (fractions or DEFAULT_FRACTIONS).items():
        stop = min(n, start + round(fraction * n))
        out[s] = t.take(slice(start, stop))
        start = stop
    return out


def table_dataset(
    name: str,
    split: str,
    table: Mapping[str, np.ndarray],
    fields: Mapping[str, str | Sequence[str]],
    labels: Mapping[str, str],
    text: Mapping[str, Tokenizer] | None = None,
    origin: str = "the table",
) -> DictDataset:
    """A :class:`~mtlgraph.DictDataset` of a table's columns.

    Args:
        name: Dataset name.
        split: Split name.
        table: Columns (from :func:`read_table`, perhaps cut by :func:`split_table`).
        fields: Input field -> column (or list of numeric columns).
        labels: Task name -> label column.
        text: Column -> tokenizer (a :class:`WordTokenizer` or any ``str -> ids`` callable);
            these columns are tokenised instead of read as numbers.
        origin: How messages name a plain mapping (a :class:`Table` names its file).

    Raises:
        DataError: Absent columns, cells that are not numbers: every problem at once.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.data.sources import WordTokenizer, table_dataset
        >>> table = {"desc": np.array(["red shoe", "blue hat"], dtype=object),
        ...          "price": np.array([9.5, 20.0]), "clicked": np.array([1, 0])}
        >>> tok = WordTokenizer.fit(table["desc"], vocab_size=10)
        >>> ds = table_dataset("products", "train", table, {"desc": "desc", "price": "price"},
        ...                    {"click_task": "clicked"}, text={"desc": tok})
        >>> x, y = ds.batch(slice(0, 2))
        >>> x["desc"].tolist(), x["price"].tolist(), y["click_task"].tolist()
        ([[4, 5], [2, 3]], [[9.5], [20.0]], [1, 0])
    """
    t = as_table(table, origin)
    try:
        X, Y = table_columns(t, fields, labels, text)
    except DataError as e:
        header = f"cannot read dataset '{name}' ({split}) from {t.origin}:"
        raise DataError(e.problems, header=header) from e
    return DictDataset(name, split, X, Y)


def table_columns(
    table: Table,
    fields: Mapping[str, str | Sequence[str]],
    labels: Mapping[str, str],
    text: Mapping[str, Tokenizer] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(X, Y)``: every input field and label of a table.

    Raises:
        DataError: Every absent column and bad cell at once.
    """
    problems: list[str] = []
    X: dict[str, Any] = {}
    Y: dict[str, torch.Tensor] = {}
    for fld, columns in fields.items():
        try:
            X[fld] = field_values(table, columns, table.origin, text)
        except DataError as e:
            problems += [f"fields.{fld}: {p}" for p in e.problems]
    for task, column in labels.items():
        try:
            Y[task] = label_values(table, column, table.origin)
        except DataError as e:
            problems += [f"labels.{task}: {p}" for p in e.problems]
    if problems:
        n = len(problems)
        raise DataError(
            problems,
            header=f"cannot read {table.origin} ({n} problem{'s' * (n > 1)}):" if n > 1 else None,
        )
    return X, Y
