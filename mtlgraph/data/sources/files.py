"""Data files -> columns: THE reader of every file format mtlgraph reads.

One parser per format (CSV, JSON Lines, Parquet, ``.npz``, ``.npy`` files or directories), each
reading a whole file or chunks of rows from the same code, so a file means the same rows
everywhere; the rules (encoding, line ends, cell limits, what is an error) are in
docs/data-sources.md. A :class:`Table` is ``{column: numpy array}`` that also knows where each
row is in its file; :mod:`mtlgraph.data.sources.table` turns the columns into tensors.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import DataError

TABLE_FORMATS = ("csv", "jsonl", "parquet", "npz", "npy")
"""File formats :func:`read_table` reads (``npy``: one ``.npy`` file, or a directory of
``<column>.npy`` files)."""

SUFFIXES = dict(
    csv="csv", jsonl="jsonl", ndjson="jsonl", parquet="parquet", pq="parquet", npz="npz", npy="npy"
)
"""File suffix -> format."""

CELL_LIMIT = 64 * 2**20
"""The largest CSV cell read, in characters (64 MiB)."""


class Table(dict[str, np.ndarray]):
    """Columns of equal length by name, and where each row is in its file.

    Args:
        columns: ``{column: array}``.
        origin: How messages name the file (``"'data.csv'"``).
        lines: The 1-based line (CSV, JSON Lines) or row (other formats) of each row in the file;
            ``None`` = rows ``1..N``.
        unit: ``"line"`` or ``"row"``: what ``lines`` counts.
        typed: Arrays keep their dtype and shape (``.npz``, ``.npy``, generators); else numbers
            are read as ``float32`` (CSV, JSON Lines, Parquet).

    Example:
        >>> import numpy as np
        >>> t = Table({"x": np.array([1.0, 2.0])}, "'t.csv'", np.array([2, 4]), "line")
        >>> t.place(1), table_length(t)
        ("'t.csv' line 4", 2)
    """

    def __init__(
        self,
        columns: Mapping[str, np.ndarray] | None = None,
        origin: str = "the table",
        lines: np.ndarray | None = None,
        unit: str = "row",
        typed: bool = False,
    ) -> None:
        super().__init__(columns or {})
        self.origin, self.lines, self.unit, self.typed = origin, lines, unit, typed

    def place(self, i: int) -> str:
        """Where row ``i`` (0-based) is: ``"'data.csv' line 7"``."""
        n = int(self.lines[i]) if self.lines is not None else i + 1
        return f"{self.origin} {self.unit} {n}"

    def take(self, index: slice | np.ndarray) -> Table:
        """The rows ``index`` (a slice or a boolean mask), still knowing their lines."""
        lines = self.lines if self.lines is not None else np.arange(1, table_length(self) + 1)
        return Table(
            {k: v[index] for k, v in self.items()}, self.origin, lines[index], self.unit, self.typed
        )


def as_table(table: Mapping[str, np.ndarray], origin: str = "the table") -> Table:
    """``table`` as a :class:`Table` (a plain mapping's rows are numbered ``1..N``)."""
    return table if isinstance(table, Table) else Table(table, origin)


def table_length(table: Mapping[str, Any]) -> int:
    """Rows of a table (0 for no columns)."""
    return len(next(iter(table.values()))) if table else 0


def table_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format of ``path``: ``fmt`` when given, else from its suffix (a directory: ``npy``).

    Raises:
        DataError: An unknown format, or a suffix that names none.
    """
    if fmt is not None:
        if fmt not in TABLE_FORMATS:
            raise DataError(
                [
                    f"unknown file format '{fmt}'{did_you_mean(fmt, TABLE_FORMATS)}; "
                    f"use one of {quoted(TABLE_FORMATS)}"
                ]
            )
        return fmt
    if Path(path).is_dir():
        return "npy"
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in SUFFIXES:
        raise DataError(
            [
                f"cannot tell the format of '{path}' from its suffix; use one of "
                f"{quoted('.' + s for s in SUFFIXES)}, or give the format "
                f"(one of {quoted(TABLE_FORMATS)})"
            ]
        )
    return SUFFIXES[suffix]


def read_table(
    path: str | os.PathLike[str], fmt: str | None = None, columns: Sequence[str] | None = None
) -> Table:
    """A whole data file as columns (:func:`iter_table` in one chunk).

    CSV cells stay strings (converted where a numeric field or label is asked for, naming the
    line on failure); JSON Lines and Parquet keep their numbers; ``.npy`` files stay mapped.

    Args:
        path: The file (a directory of ``.npy`` files for ``npy``).
        fmt: One of :data:`TABLE_FORMATS`; ``None`` = from the suffix.
        columns: Only these columns (all of them when ``None``); a missing one is an error.

    Raises:
        DataError: A missing or unreadable file, a malformed row or header, an absent column
            (named, with the columns the file has); Parquet without pyarrow names the extra.

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.data.sources import read_table
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.jsonl"
        >>> _ = f.write_text('{"x": 1.5, "y": 0}\\n{"x": 2.0, "y": 1}\\n')
        >>> read_table(f)["x"].tolist()
        [1.5, 2.0]
    """
    return next(iter_table(path, fmt, columns, None))


def iter_table(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    columns: Sequence[str] | None = None,
    rows: int | None = 65536,
) -> Iterator[Table]:
    """A data file as chunks of at most ``rows`` rows, in file order (one chunk when ``None``);
    only a chunk is in memory at a time. The header and every row are checked as they are read.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
        >>> _ = f.write_text('x,note\\n1,"two\\nlines"\\n2,b\\n3,c\\n')
        >>> [(c["x"].tolist(), c.place(0)) for c in iter_table(f, rows=2)]
        [(['1', '2'], "'...t.csv' line 2"), (['3'], "'...t.csv' line 5")]
    """
    file = Path(path)
    fmt = table_format(file, fmt)
    if not (file.exists() if fmt == "npy" else file.is_file()):
        raise DataError([f"file '{file}' does not exist"])
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return _READERS[fmt](file, columns, rows)


def select_columns(names: Sequence[str], columns: Sequence[str] | None, origin: str) -> list[str]:
    """``columns`` (all ``names`` when ``None``), each once.

    Raises:
        DataError: Every column of ``columns`` not in ``names``, with a suggestion.
    """
    if columns is None:
        return list(names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            [
                f"{origin} has no column '{c}'{did_you_mean(c, names)}; it has {quoted(names)}"
                for c in missing
            ]
        )
    return list(dict.fromkeys(columns))


def _check_names(names: Sequence[str], origin: str, where: str) -> None:
    problems = []
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if not name:
            problems.append(f"{origin} {where}, column {j + 1}: an empty column name; name it")
        elif name in seen:
            problems.append(
                f"{origin} {where}, column {j + 1}: column name '{name}' again (also column "
                f"{seen[name] + 1}); give every column its own name"
            )
        seen.setdefault(name, j)
    if problems:
        raise DataError(problems)


def _all_empty(origin: str, unit: str, line: int) -> DataError:
    return DataError(
        [
            f"{origin} {unit} {line}: every cell of the row is empty; rows are never skipped, "
            "so remove it or fill it"
        ]
    )


@contextmanager
def _cell_limit() -> Iterator[None]:
    """CSV cells up to :data:`CELL_LIMIT` while a chunk is read; the csv module's (process-wide)
    limit is restored before control leaves the reader."""
    old = csv.field_size_limit(CELL_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _open_text(file: Path) -> TextIO:
    return file.open(encoding="utf-8-sig", newline="")


def _csv_row(reader: Any, origin: str, line: int = 1) -> list[str] | None:
    """The next row of ``reader``, which starts on line ``line``."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        if "unexpected end of data" in str(e):  # strict quoting: the file ends inside a quote
            raise DataError([_unclosed_quote(origin, line, reader.line_num)]) from None
        if "expected after" in str(e):
            raise DataError(
                [
                    f'{origin} line {reader.line_num}: text follows a closing quote (") in a '
                    'cell; quote the whole cell, or double a quote inside a quoted cell ("")'
                ]
            ) from None
        hint = f" (cells hold at most {CELL_LIMIT // 2**20} MiB)" if "field limit" in str(e) else ""
        raise DataError([f"{origin} line {reader.line_num}: {e}{hint}"]) from e
    except UnicodeDecodeError as e:
        raise DataError(
            [f"{origin} line {reader.line_num + 1}: not UTF-8 text ({e.reason}); save it as UTF-8"]
        ) from e


def _unclosed_quote(origin: str, line: int, last: int) -> str:
    return (
        f'{origin} line {line}: a quote (") opened in this row is never closed, so the '
        f"row runs to the end of the file (line {last}); close it, or double a quote inside "
        'a quoted cell ("")'
    )


def _check_row(row: list[str], names: list[str], origin: str, line: int, last: int) -> None:
    """Row ``row`` of lines ``line..last`` (more than one: a quoted cell holds newlines)."""
    if not any(c.strip() for c in row):
        raise _all_empty(origin, "line", line)
    if len(row) != len(names):
        if len(row) < len(names):
            where = f"column '{names[len(row)]}'"
        else:
            where = f"column {len(names) + 1} (past the last, '{names[-1]}')"
        quote = ""
        if last > line:  # the cells ran over several lines: a quote paired with a later one
            quote = (
                f'; the row runs from line {line} to line {last} inside quotes: a quote (") '
                f"opened on line {line} is probably unbalanced (double a quote inside a "
                'quoted cell: "")'
            )
        raise DataError(
            [
                f"{origin} line {line}, {where}: {len(row)} cells, but the header names "
                f"{len(names)} columns; every row needs one cell per column{quote}"
            ]
        )


def _csv_chunks(file: Path, columns: Sequence[str] | None, rows: int | None) -> Iterator[Table]:
    origin = f"'{file}'"
    with _open_text(file) as fh:
        reader = csv.reader(fh, strict=True)  # a quote left open is an error, never a cell
        with _cell_limit():
            header = _csv_row(reader, origin)
        if header is None:
            raise DataError([f"{origin} is empty; its first line must name the columns"])
        names = [h.strip() for h in header]
        _check_names(names, origin, "line 1")
        keep = [(c, names.index(c)) for c in select_columns(names, columns, origin)]
        first = True  # a header and no rows: one table of 0 rows, its columns named
        while True:
            lines: list[int] = []
            cells: list[list[str]] = [[] for _ in keep]
            with _cell_limit():
                while rows is None or len(lines) < rows:
                    line = reader.line_num + 1
                    row = _csv_row(reader, origin, line)
                    if row is None:
                        break
                    _check_row(row, names, origin, line, reader.line_num)
                    lines.append(line)
                    for out, (_, j) in zip(cells, keep, strict=True):
                        out.append(row[j])
            full = rows is not None and len(lines) == rows
            if lines or rows is None or first:
                first = False
                arrays = {
                    c: np.asarray(v, dtype=object) for (c, _), v in zip(keep, cells, strict=True)
                }
                yield Table(arrays, origin, np.asarray(lines, dtype=np.int64), "line")
            if not full:
                return


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_object(text: str, origin: str, line: int) -> dict[str, Any]:
    where = f"{origin} line {line}"
    if not text.strip():
        raise _all_empty(origin, "line", line)
    try:
        row = json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as e:
        raise DataError([f"{where}, column '{e.args[0]}': the key appears twice"]) from e
    except ValueError as e:
        raise DataError([f"{where}: not valid JSON ({e}); write one object per line"]) from e
    if not isinstance(row, dict):
        raise DataError([f"{where}: not a JSON object; write one object per line"])
    return row


def _check_keys(row: Mapping[str, Any], names: list[str], origin: str, line: int) -> None:
    missing = [n for n in names if n not in row]
    extra = [k for k in row if k not in names]
    if missing or extra:
        column, what = (missing[0], "missing") if missing else (extra[0], "not in the first line")
        raise DataError(
            [
                f"{origin} line {line}, column '{column}': {what}; every line needs the keys of "
                f"the first ({quoted(names)})"
            ]
        )
    if all(v is None or (isinstance(v, str) and not v.strip()) for v in row.values()):
        raise _all_empty(origin, "line", line)


def _json_column(values: list[Any]) -> np.ndarray:
    """Numbers as a float64/int64 array (``null`` -> NaN); anything else as objects."""
    numbers = [v for v in values if v is not None]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        if len(numbers) == len(values):
            return np.asarray(values)
        return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _jsonl_chunks(file: Path, columns: Sequence[str] | None, rows: int | None) -> Iterator[Table]:
    origin = f"'{file}'"
    names: list[str] | None = None
    keep: list[str] = []
    lines: list[int] = []
    objects: list[dict[str, Any]] = []

    def chunk() -> Table:
        arrays = {c: _json_column([o[c] for o in objects]) for c in keep}
        return Table(arrays, origin, np.asarray(lines, dtype=np.int64), "line")

    line = 0
    with _open_text(file) as fh:
        try:
            for line, text in enumerate(fh, 1):
                row = _json_object(text, origin, line)
                if names is None:
                    names = list(row)
                    _check_names(names, origin, "line 1")
                    keep = select_columns(names, columns, origin)
                _check_keys(row, names, origin, line)
                lines.append(line)
                objects.append(row)
                if rows is not None and len(lines) == rows:
                    yield chunk()
                    lines, objects = [], []
        except UnicodeDecodeError as e:
            raise DataError(
                [f"{origin} line {line + 1}: not UTF-8 text ({e.reason}); save it as UTF-8"]
            ) from e
    if names is None:
        raise DataError([f"{origin} is empty; write one JSON object per line"])
    if lines or rows is None:
        yield chunk()


def _empty_cells(values: np.ndarray) -> np.ndarray:
    """Which cells are empty: null, NaN or blank text."""
    if values.dtype.kind == "f" and values.ndim == 1:
        return np.isnan(values)
    if values.dtype.kind != "O":
        return np.zeros(len(values), dtype=bool)
    return np.fromiter(
        (
            v is None
            or (isinstance(v, str) and not v.strip())
            or (isinstance(v, float) and math.isnan(v))
            for v in values
        ),
        dtype=bool,
        count=len(values),
    )


def _parquet_column(col: Any) -> np.ndarray:
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind in "biuf":
        return values
    return _json_column(col.to_pylist())


def _open_parquet(file: Path) -> Any:
    """A ``pyarrow.parquet.ParquetFile``.

    Raises:
        DataError: No pyarrow (naming the extra), an empty or broken file (naming it).
    """
    try:
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise DataError(
            [f"reading Parquet ('{file}') needs pyarrow: pip install 'mtlgraph[tables]'"]
        ) from None
    origin = f"'{file}'"
    if file.stat().st_size == 0:
        raise DataError([f"{origin} is empty (0 bytes), not a Parquet file; write it again"])
    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow's refusal of a broken file: a problem of this file
        raise DataError([f"cannot read {origin} as Parquet: {type(e).__name__}: {e}"]) from e


def parquet_rows(path: str | os.PathLike[str]) -> int:
    """Rows of a Parquet file, from its metadata (the rows are not read).

    Raises:
        DataError: As :func:`read_table` for a missing, empty or broken file.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError([f"file '{file}' does not exist"])
    return int(_open_parquet(file).metadata.num_rows)


def _parquet_chunks(file: Path, columns: Sequence[str] | None, rows: int | None) -> Iterator[Table]:
    origin = f"'{file}'"
    parquet = _open_parquet(file)
    names = list(parquet.schema_arrow.names)
    _check_names(names, origin, "schema")
    keep = select_columns(names, columns, origin)
    start = 0
    total = parquet.metadata.num_rows
    for record in parquet.iter_batches(batch_size=rows or max(total, 1)):
        arrays = {c: _parquet_column(record.column(c)) for c in names}
        n = record.num_rows
        empty = np.ones(n, dtype=bool)
        for values in arrays.values():
            empty &= _empty_cells(values)
        if empty.any():
            raise _all_empty(origin, "row", start + int(np.argmax(empty)) + 1)
        yield Table({c: arrays[c] for c in keep}, origin, np.arange(start + 1, start + n + 1))
        start += n
    if total == 0:
        yield Table({c: np.zeros(0) for c in keep}, origin)


def _array_chunks(
    arrays: Mapping[str, np.ndarray],
    origin: str,
    rows: int | None,
    places: Mapping[str, str] | None = None,
) -> Iterator[Table]:
    """Chunks of arrays of equal length (``places``: how messages name a column's array)."""
    where = places or {c: f"{origin}, column '{c}'" for c in arrays}
    scalars = [
        f"{where[c]}: a 0-d array (one value, shape ()); a column needs a value per row: save "
        "an array of shape (N,) or (N, k)"
        for c, a in arrays.items()
        if a.ndim == 0
    ]
    if scalars:
        raise DataError(scalars)
    lengths = {c: len(a) for c, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"'{c}': {n}" for c, n in lengths.items())
        raise DataError([f"{origin}: the arrays have different lengths ({listing})"])
    n = next(iter(lengths.values()), 0)
    step = rows or max(n, 1)
    for start in range(0, max(n, 1), step):
        chunk = {c: a[start : start + step] for c, a in arrays.items()}
        yield Table(
            chunk,
            origin,
            None if start == 0 else np.arange(start + 1, start + step + 1)[: table_length(chunk)],
            typed=True,
        )


def _npz_chunks(file: Path, columns: Sequence[str] | None, rows: int | None) -> Iterator[Table]:
    origin = f"'{file}'"
    if not zipfile.is_zipfile(file):
        raise DataError(
            [f"{origin} is not a .npz file ({_looks_like(file)}); save arrays with numpy.savez"]
        )
    try:
        with np.load(file, allow_pickle=False) as npz:
            keep = select_columns(list(npz.files), columns, origin)
            arrays = {c: npz[c] for c in keep}
    except ValueError as e:
        if "pickled" not in str(e):
            raise DataError([f"cannot read {origin} as .npz: {type(e).__name__}: {e}"]) from e
        raise DataError([f"{origin}: {_PICKLED}"]) from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError([f"cannot read {origin} as .npz: {type(e).__name__}: {e}"]) from e
    yield from _array_chunks(arrays, origin, rows)


_PICKLED = (
    "an array of Python objects (dtype object), which is never unpickled; save numbers, e.g. "
    "numpy.save(path, array.astype(np.float32))"
)


def _looks_like(file: Path) -> str:
    """What a file that is not the binary format it should be seems to hold, for messages."""
    with file.open("rb") as fh:
        head = fh.read(64)
    if not head:
        return "it is empty: 0 bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {head[:8]!r}"
    return f"it starts with the text {text[:20]!r}"


def _load_npy(file: Path) -> np.ndarray:
    """A ``.npy`` file, memory-mapped (never unpickled).

    Raises:
        DataError: Not a ``.npy`` file, an object array, or a file shorter than its header says.
    """
    origin = f"'{file}'"
    with file.open("rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise DataError(
            [
                f"{origin} is not a .npy file ({_looks_like(file)}; a .npy file starts with "
                "\\x93NUMPY); save arrays with numpy.save"
            ]
        )
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "pickled" in str(e) or "Python objects" in str(e):
            raise DataError([f"{origin}: {_PICKLED}"]) from None
        raise DataError([f"cannot read {origin}: {type(e).__name__}: {e}"]) from e
    except OSError as e:
        raise DataError([f"cannot read {origin}: {type(e).__name__}: {e}"]) from e


def _npy_chunks(folder: Path, columns: Sequence[str] | None, rows: int | None) -> Iterator[Table]:
    """A directory of ``<column>.npy`` files, or one ``.npy`` file (one column, its stem)."""
    if folder.is_file():
        folder, names = folder.parent, [folder.stem]
        origin = f"'{folder / names[0]}.npy'"
    else:
        origin = f"directory '{folder}'"
        names = sorted(p.stem for p in folder.glob("*.npy"))
    if not names:
        raise DataError([f"{origin} holds no .npy file; save one array per field or label"])
    arrays = {}
    problems: list[str] = []
    for c in select_columns(names, columns, origin):
        try:
            arrays[c] = _load_npy(folder / f"{c}.npy")
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    places = {c: f"'{folder / c}.npy'" for c in arrays}  # each column's own file
    yield from _array_chunks(arrays, origin, rows, places)


_READERS: dict[str, Callable[[Path, Sequence[str] | None, int | None], Iterator[Table]]] = {
    "csv": _csv_chunks,
    "jsonl": _jsonl_chunks,
    "parquet": _parquet_chunks,
    "npz": _npz_chunks,
    "npy": _npy_chunks,
}
