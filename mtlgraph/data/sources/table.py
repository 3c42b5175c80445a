"""Tables on disk (CSV, JSON Lines, Parquet) -> in-memory :class:`~mtlgraph.DictDataset` splits.

A table is read once into columns (``{column: numpy array}``); numeric columns become input
fields (``float32``, ``(N, 1)`` for one column, ``(N, k)`` for a list of ``k``) or labels
(``int64`` when every value is a whole number, else ``float32``); ``text`` columns become
variable-length id sequences through a tokenizer (padded per batch, with a ``<field>_mask``).
The result is a plain :class:`~mtlgraph.DictDataset`, batched by slicing: the fast path.

CSV and JSON Lines need nothing beyond the standard library; Parquet needs pyarrow
(``pip install 'mtlgraph[tables]'``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataset
from mtlgraph.exceptions import DataError

Table = dict[str, np.ndarray]
"""Columns of equal length by name."""

Tokenizer = Callable[[str], Any]
"""Text -> a sequence of ids (a 1-D tensor or a list of ints)."""

TABLE_FORMATS = ("csv", "jsonl", "parquet")
"""File formats :func:`read_table` reads."""

_SUFFIXES = {
    "csv": "csv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
}

DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}
"""How :func:`split_table` cuts a table without a split column or fractions."""


def table_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format of ``path``: ``fmt`` when given, else from its suffix."""
    if fmt is not None:
        return fmt
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in _SUFFIXES:
        raise DataError(
            [
                f"cannot tell the format of '{path}' from its suffix; use .csv, .jsonl or "
                ".parquet, or give the format (one of 'csv', 'jsonl', 'parquet')"
            ]
        )
    return _SUFFIXES[suffix]


def read_table(
    path: str | os.PathLike[str], fmt: str | None = None, columns: Sequence[str] | None = None
) -> Table:
    """Read a CSV, JSON Lines or Parquet file into columns.

    CSV cells stay strings (converted where a numeric column is asked for, with the row named on
    failure); JSON Lines and Parquet keep their numbers.

    Args:
        path: The file.
        fmt: ``"csv"``, ``"jsonl"`` or ``"parquet"``; ``None`` = from the suffix.
        columns: Only these columns (all of them when ``None``); a missing one is an error.

    Raises:
        DataError: A missing or unreadable file, a malformed row, an absent column (named, with
            the columns the file has); Parquet without pyarrow names the extra to install.

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.data.sources import read_table
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.jsonl"
        >>> _ = f.write_text('{"x": 1.5, "y": 0}\\n{"x": 2.0, "y": 1}\\n')
        >>> read_table(f)["x"].tolist()
        [1.5, 2.0]
    """
    file = Path(path)
    fmt = table_format(file, fmt)
    if not file.is_file():
        raise DataError([f"file '{file}' does not exist"])
    if fmt == "parquet":
        table = _read_parquet(file, columns)
    elif fmt == "jsonl":
        table = _read_jsonl(file)
    elif fmt == "csv":
        table = _read_csv(file)
    else:
        raise DataError([f"unknown table format {fmt!r}; use one of {quoted(TABLE_FORMATS)}"])
    if columns is not None:
        missing = [c for c in columns if c not in table]
        if missing:
            raise DataError(
                [
                    f"'{file}' has no column '{c}'{did_you_mean(c, table)}; it has {quoted(table)}"
                    for c in missing
                ]
            )
        table = {c: table[c] for c in columns}
    return table


def _read_csv(file: Path) -> Table:
    with file.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError([f"'{file}' is empty; its first row must name the columns"])
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    for i, r in enumerate(body):
        if len(r) > len(header):
            raise DataError(
                [f"'{file}' row {i + 1}: {len(r)} cells, but the header names {len(header)}"]
            )
    return {
        name: np.asarray([r[j] if j < len(r) else "" for r in body], dtype=object)
        for j, name in enumerate(header)
    }


def _read_jsonl(file: Path) -> Table:
    rows: list[dict[str, Any]] = []
    with file.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(
                    [f"'{file}' line {line_no} is not valid JSON ({e}); one object per line"]
                ) from None
            if not isinstance(row, dict):
                raise DataError([f"'{file}' line {line_no} is not a JSON object"])
            rows.append(row)
    names = list(dict.fromkeys(k for r in rows for k in r))
    table: Table = {}
    for name in names:
        values = [r.get(name) for r in rows]
        table[name] = _array(values)
    return table


def _array(values: list[Any]) -> np.ndarray:
    """Numbers as a float64/int64 array (``None`` -> NaN); anything else as objects."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values)
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return np.asarray(values, dtype=object)


def _read_parquet(file: Path, columns: Sequence[str] | None) -> Table:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise DataError(
            [f"reading Parquet ('{file}') needs pyarrow: pip install 'mtlgraph[tables]'"]
        ) from None
    try:
        schema_names = pq.read_schema(file).names
        wanted = [c for c in columns if c in schema_names] if columns is not None else None
        arrow = pq.read_table(file, columns=wanted)
    except Exception as e:  # pyarrow's refusal of a broken file: a problem of this file
        raise DataError([f"cannot read '{file}' as Parquet: {type(e).__name__}: {e}"]) from None
    table: Table = {}
    for name in arrow.column_names:
        col = arrow.column(name)
        try:
            table[name] = col.to_numpy()
        except Exception:  # nested or mixed types: plain Python objects
            table[name] = np.asarray(col.to_pylist(), dtype=object)
        if table[name].dtype.kind not in "biuf":
            table[name] = _array(col.to_pylist())
    return table


def table_length(table: Mapping[str, np.ndarray]) -> int:
    """Rows of a table (0 for no columns)."""
    return len(next(iter(table.values()))) if table else 0


def numeric_column(values: np.ndarray, what: str) -> np.ndarray:
    """A column as numbers: strings are parsed (empty cells are NaN), numbers kept.

    Raises:
        DataError: A cell that is not a number, naming ``what`` and the data row (1-based).
    """
    if values.dtype.kind in "biuf":
        return values
    out = np.empty(len(values), dtype=np.float64)
    for i, cell in enumerate(values):
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            out[i] = math.nan
            continue
        try:
            if isinstance(cell, bool):
                raise ValueError
            out[i] = float(cell)
        except (TypeError, ValueError):
            raise DataError(
                [
                    f"{what} holds {cell!r} in data row {i + 1}, not a number; numeric fields "
                    "and labels need numbers (declare the column under 'text' to tokenise it)"
                ]
            ) from None
    return out


def split_table(
    table: Table,
    split_column: str | None = None,
    fractions: Mapping[str, float] | None = None,
    origin: str = "the table",
) -> dict[str, Table]:
    """Cut a table into splits: by the values of ``split_column``, else by ``fractions`` in row
    order (default 80/10/10 % train/valid/test)."""
    if split_column is not None:
        if split_column not in table:
            raise DataError(
                [
                    f"{origin} has no split column '{split_column}'"
                    f"{did_you_mean(split_column, table)}; it has {quoted(table)}"
                ]
            )
        labels = np.asarray([str(v) for v in table[split_column]])
        return {
            s: {k: v[labels == s] for k, v in table.items()} for s in dict.fromkeys(labels.tolist())
        }
    n = table_length(table)
    out: dict[str, Table] = {}
    start = 0
    for s, fraction in (fractions or DEFAULT_FRACTIONS).items():
        stop = min(n, start + round(fraction * n))
        out[s] = {k: v[start:stop] for k, v in table.items()}
        start = stop
    return out


def encode_texts(values: np.ndarray, tokenizer: Tokenizer, what: str) -> list[torch.Tensor]:
    """Each cell's ids as a 1-D ``int64`` tensor (missing cells are empty texts)."""
    out = []
    for i, cell in enumerate(values):
        text = "" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else str(cell)
        try:
            ids = tokenizer(text)
        except Exception as e:
            e.add_note(f"mtlgraph: while tokenising {what}, data row {i + 1}")
            raise
        out.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
    return out


def field_values(
    table: Table,
    columns: str | Sequence[str],
    origin: str,
    text: Mapping[str, Tokenizer] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """One input field from its column(s): a tokenised text column gives a list of id tensors,
    numeric columns a ``float32`` tensor (``(N, 1)`` for one column, ``(N, k)`` for ``k``)."""
    listed = [columns] if isinstance(columns, str) else list(columns)
    _require(table, listed, origin)
    text = text or {}
    if isinstance(columns, str) and columns in text:
        return encode_texts(table[columns], text[columns], f"column '{columns}' of {origin}")
    tokenised = [c for c in listed if c in text]
    if tokenised:
        raise DataError([f"text column '{tokenised[0]}' must be a field of its own"])
    arrays = [numeric_column(table[c], f"column '{c}' of {origin}") for c in listed]
    stacked = np.stack(arrays, axis=1) if arrays else np.zeros((0, 0))
    if stacked.dtype.kind == "f" or len(listed) > 1 or stacked.dtype.kind in "biu":
        stacked = stacked.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def label_values(table: Table, column: str, origin: str) -> torch.Tensor:
    """A label column: ``int64`` when every value is a whole number, else ``float32``."""
    _require(table, [column], origin)
    values = numeric_column(table[column], f"label column '{column}' of {origin}")
    whole = values.dtype.kind in "biu" or bool(
        np.all(np.isfinite(values)) and np.all(values == np.round(values))
    )
    return torch.from_numpy(np.ascontiguousarray(values.astype(np.int64 if whole else np.float32)))


def _require(table: Table, columns: Sequence[str], origin: str) -> None:
    missing = [c for c in columns if c not in table]
    if missing:
        raise DataError(
            [
                f"{origin} has no column '{c}'{did_you_mean(c, table)}; it has {quoted(table)}"
                for c in missing
            ]
        )


def table_dataset(
    name: str,
    split: str,
    table: Table,
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
        origin: How messages name the table (e.g. its file).

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
    problems: list[str] = []
    X: dict[str, Any] = {}
    Y: dict[str, torch.Tensor] = {}
    for fld, columns in fields.items():
        try:
            X[fld] = field_values(table, columns, origin, text)
        except DataError as e:
            problems += [f"field '{fld}': {p}" for p in e.problems]
    for task, column in labels.items():
        try:
            Y[task] = label_values(table, column, origin)
        except DataError as e:
            problems += [f"label '{task}': {p}" for p in e.problems]
    if problems:
        raise DataError(problems, header=f"cannot read dataset '{name}' ({split}) from {origin}:")
    return DictDataset(name, split, X, Y)
