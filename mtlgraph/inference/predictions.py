"""Prediction files: one row per example, an ``id`` column and each task's predictions, streamed
into JSON Lines, CSV or Parquet (columns: ``docs/inference.md``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from torch import nn

from mtlgraph._io import atomic_write, import_extra
from mtlgraph._suggest import quoted
from mtlgraph.data.sources.files import SUFFIXES
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.graph.task import INPUT, Task
from mtlgraph.inference.evaluation import iter_predictions
from mtlgraph.inference.protocol import Batches, InferenceModel

WRITE_FORMATS = ("jsonl", "csv", "parquet")
"""The formats :func:`write_predictions` writes (a file's suffix tells it as for the readers)."""

ID = "id"
"""Name of the id column."""

MISSING = "missing"
"""Name of the column that says why a row has no predictions (with ``allow_missing``)."""

Columns = dict[str, np.ndarray]


def prediction_format(path: str | os.PathLike[str], file_format: str | None = None) -> str:
    """The output format: ``file_format`` if given, else from the file's suffix.

    Raises:
        ConfigError: An unknown format, or a suffix of none of :data:`WRITE_FORMATS`.
    """
    fmt = file_format or SUFFIXES.get(Path(path).suffix.lstrip(".").lower())
    if fmt in WRITE_FORMATS:
        return fmt
    if file_format is not None:
        choose = quoted(WRITE_FORMATS)
        raise ConfigError([f"unknown prediction file format {file_format!r}; choose {choose}"])
    raise ConfigError(
        [f"cannot tell the format of '{path}' from its suffix; name it .jsonl, .csv or .parquet"]
    )


def task_columns(task: Task, probs: torch.Tensor) -> Columns:
    """One task's prediction columns for a batch of ``output_func`` values (see the table)."""
    t = task.name
    preds = task.predictions(probs).numpy()
    p = probs.numpy()
    if task.task_type == "regression":
        return {f"{t}/value": p}
    if task.task_type == "multiclass":
        return {f"{t}/pred": preds, f"{t}/probs": p}
    if task.task_type == "binary":
        if p.ndim == 2 and p.shape[1] == 2:
            p = p[:, 1]
        return {f"{t}/pred": preds, f"{t}/prob": p}
    return {f"{t}/preds": preds, f"{t}/probs": p}


def iter_prediction_rows(
    model: InferenceModel,
    batches: Batches,
    task_names: Sequence[str],
    id_field: str | None = None,
    allow_missing: bool = False,
) -> Iterator[tuple[list[Any], Columns, list[str | None] | None]]:
    """Per batch: the ids, the prediction columns (arrays with a row per example) and, with
    ``allow_missing``, why each row has no predictions (``None``: it has them).

    Raises:
        DataError: A non-finite value in an input field the tasks read, naming the row, its id
            and the field (unless ``allow_missing``: the row's outputs are then null).
    """
    checked = _finite_rows(model, batches, task_names, id_field, allow_missing)
    start = 0
    for X, probs in iter_predictions(model, checked, task_names):
        n = len(next(iter(probs.values())))
        ids = _ids(X, id_field, start, n)
        start += n
        columns: Columns = {}
        for task_name, p in probs.items():
            columns.update(task_columns(model.tasks[task_name], p))
        yield ids, columns, X[_REASONS] if allow_missing else None


_REASONS = "__missing__"  # the batch key that carries each row's reason to the writer


def _ids(X: Mapping[str, Any], id_field: str | None, start: int, n: int) -> list[Any]:
    if id_field is None:
        return list(range(start, start + n))
    if id_field not in X:
        raise DataError([f"the batches have no id field '{id_field}'; they have {quoted(X)}"])
    return _plain(X[id_field])


def _finite_rows(
    model: InferenceModel,
    batches: Batches,
    task_names: Sequence[str],
    id_field: str | None,
    allow_missing: bool,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """The batches, each float input field the tasks read checked, before the model runs, for
    the width the model was trained with (a :class:`DataError` naming the field, the module and
    both widths) and for NaN and infinities: a :class:`DataError`, or (``allow_missing``) the
    row's values zeroed and its reason kept."""
    from mtlgraph.inference.export import input_fields

    fields: list[str] | None = None
    widths: dict[str, tuple[str, int]] = {}
    start = 0
    for X, Y in batches:
        if fields is None:
            fields = input_fields(model, task_names, [k for k in X if k != id_field])
            widths = trained_widths(model, task_names)
        _check_widths(X, widths)
        n = _rows(X, fields)
        reasons: list[str | None] = [None] * n
        X = dict(X)
        for f in fields:
            v = X.get(f)
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim == 0:
                continue
            bad = ~torch.isfinite(v).reshape(len(v), -1).all(dim=1)
            if not bad.any():
                continue
            rows = bad.nonzero().flatten().tolist()
            if not allow_missing:
                raise _nonfinite_error(X, f, v, rows[0], start, id_field)
            X[f] = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype))
            for i in rows:
                reasons[i] = reasons[i] or f"input field '{f}' is {_kind(v[i])}"
        X[_REASONS] = reasons
        start += n
        yield X, Y


def trained_widths(model: InferenceModel, task_names: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``{field: (module, width)}``: the input fields a task's operation reads alone with a
    ``Linear``, or a ``Sequential`` (an MLP) whose first layer is one: the field's last dimension
    meets that layer first, so its ``in_features`` is the width it was trained on. Any other
    module (a ``Flatten`` first, a custom ``forward``) is not second-guessed.

    Example:
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> model = MultitaskClassifier([Task("t", {"head": nn.Linear(2, 3)},
        ...     [Operation("head", [("_input_", "xy")])])])
        >>> trained_widths(model, ["t"])
        {'xy': ('head', 2)}
    """
    out: dict[str, tuple[str, int]] = {}
    for t in task_names:
        for op in model.tasks[t].op_sequence:
            if len(op.inputs) != 1 or op.inputs[0].source != INPUT or op.inputs[0].key is None:
                continue
            field = str(op.inputs[0].key)
            first = model.module_pool[op.module_name]
            while isinstance(first, nn.Sequential) and len(first):  # MLP: its first layer
                first = first[0]
            if field not in out and isinstance(first, nn.Linear):
                out[field] = (op.module_name, first.in_features)
    return out


def _check_widths(X: Mapping[str, Any], widths: Mapping[str, tuple[str, int]]) -> None:
    """Every input field of another width than its module was trained with, at once."""
    problems = []
    for f, (module, width) in widths.items():
        v = X.get(f)
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[-1] != width:
            problems.append(
                f"input field '{f}' has {v.shape[-1]} columns, but module '{module}' was trained "
                f"on {width}: give the field the {width} columns it had in training"
            )
    if problems:
        raise DataError(problems)


def _rows(X: Mapping[str, Any], fields: Sequence[str]) -> int:
    for f in fields:
        v = X.get(f)
        if v is not None and hasattr(v, "__len__"):
            return len(v)
    return 0


def _kind(v: torch.Tensor) -> str:
    """``NaN`` or ``inf`` (the first non-finite value of a row)."""
    x = float(v.reshape(-1)[~torch.isfinite(v.reshape(-1))][0])
    return "NaN" if math.isnan(x) else str(x)


def _nonfinite_error(
    X: Mapping[str, Any], field: str, v: torch.Tensor, i: int, start: int, id_field: str | None
) -> DataError:
    ids = _plain(X[id_field]) if id_field is not None and id_field in X else None
    row = f"row {start + i + 1}" + (f" (id {ids[i]!r})" if ids is not None else "")
    return DataError(
        [
            f"{row}, input field '{field}': {_kind(v[i])}; a non-finite input would get a "
            "prediction that means nothing. Fix or drop the row, or pass --allow-missing "
            "(allow_missing=True) to write null predictions for such rows, flagged in the "
            f"'{MISSING}' column"
        ]
    )


def _plain(values: Any) -> list[Any]:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    if isinstance(values, np.ndarray):
        return list(values.reshape(len(values), -1)[:, 0].tolist())
    return [str(v) if isinstance(v, os.PathLike) else v for v in values]


# ---------------------------------------------------------------- number formatting


def _number(v: Any) -> str:
    """A JSON number: the shortest text that reads back the same float32 (``null`` for NaN and
    infinities, which JSON cannot hold)."""
    if isinstance(v, (np.floating, float)) and not math.isfinite(v):
        return "null"
    return str(v)


def _flat(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if array.ndim == 1:
        return [(name, array)]
    flat = array.reshape(len(array), -1)
    return [(f"{name}/{j}", flat[:, j]) for j in range(flat.shape[1])]


# ---------------------------------------------------------------- writers


Missing = list[str | None] | None
"""Per row, why it has no predictions (``None``: it has them); ``None``: no such column."""


class _JsonLines:
    def __init__(self, fh: IO[bytes]) -> None:
        self.out = io.TextIOWrapper(fh, encoding="utf-8", newline="\n", write_through=False)

    def write(self, ids: list[Any], columns: Columns, missing: Missing = None) -> None:
        keys = [json.dumps(k) for k in columns]
        arrays = list(columns.values())
        lines = []
        for i, id_ in enumerate(ids):
            parts = [f'"{ID}": {json.dumps(id_)}']
            why = missing[i] if missing is not None else None
            if missing is not None:
                parts.append(f'"{MISSING}": {json.dumps(why)}')
            for key, a in zip(keys, arrays, strict=True):
                v = a[i]
                text = (
                    "null"
                    if why is not None
                    else "[" + ", ".join(_number(x) for x in v.reshape(-1)) + "]"
                    if isinstance(v, np.ndarray)
                    else _number(v)
                )
                parts.append(f"{key}: {text}")
            lines.append("{" + ", ".join(parts) + "}\n")
        self.out.write("".join(lines))

    def close(self) -> None:
        self.out.flush()
        self.out.detach()


class _Csv:
    def __init__(self, fh: IO[bytes]) -> None:
        self.out = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=False)
        self.writer = csv.writer(self.out)
        self.header: list[str] | None = None

    def write(self, ids: list[Any], columns: Columns, missing: Missing = None) -> None:
        flat = [pair for name, a in columns.items() for pair in _flat(name, a)]
        extra = [MISSING] if missing is not None else []
        if self.header is None:
            self.header = [ID, *extra, *(name for name, _ in flat)]
            self.writer.writerow(self.header)
        cols = [a for _, a in flat]
        for i, id_ in enumerate(ids):
            why = missing[i] if missing is not None else None
            values = [""] * len(cols) if why is not None else [str(c[i]) for c in cols]
            self.writer.writerow([str(id_), *([why or ""] if extra else []), *values])

    def close(self) -> None:
        self.out.flush()
        self.out.detach()


class _Parquet:
    def __init__(self, fh: IO[bytes]) -> None:
        self.pa, pq = import_pyarrow()
        self.fh = fh
        self.pq = pq
        self.writer: Any = None

    def write(self, ids: list[Any], columns: Columns, missing: Missing = None) -> None:
        pa = self.pa
        flat = [pair for name, a in columns.items() for pair in _flat(name, a)]
        head: dict[str, Any] = {ID: pa.array(ids)}
        mask = None
        if missing is not None:
            head[MISSING] = pa.array(missing, type=pa.string())
            mask = np.array([m is not None for m in missing])
        table = pa.table({**head, **{key: pa.array(col, mask=mask) for key, col in flat}})
        if self.writer is None:
            self.writer = self.pq.ParquetWriter(self.fh, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def import_pyarrow() -> list[Any]:
    """``[pyarrow, pyarrow.parquet]``, or an ImportError naming the ``tables`` extra."""
    return import_extra("writing Parquet", "tables", "pyarrow", "pyarrow.parquet")


class _Writer(Protocol):
    def write(self, ids: list[Any], columns: Columns, missing: Missing = None) -> None: ...

    def close(self) -> None: ...


_WRITERS: dict[str, Callable[[IO[bytes]], _Writer]] = {
    "jsonl": _JsonLines,
    "csv": _Csv,
    "parquet": _Parquet,
}


def check_output_path(path: str | os.PathLike[str], create_parents: bool = False) -> Path:
    """The output path, if it can be written: its directory exists (or, with
    ``create_parents``, can be created: no file in the way) and is writable, and it is not a
    directory itself.

    Example:
        >>> import tempfile, pathlib
        >>> base = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_path(base / "new" / "report.html", create_parents=True).name
        'report.html'

    Raises:
        ConfigError: Why it cannot be written.
    """
    target = Path(path)
    parent = target.parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(
                [
                    f"cannot write '{target}': '{parent}' is a file, not a directory; name "
                    "another path"
                ]
            )
    elif not parent.is_dir():
        raise ConfigError(
            [f"cannot write '{target}': directory '{parent}' does not exist; create it first"]
        )
    if target.is_dir():
        raise ConfigError([f"cannot write '{target}': it is a directory; name a file"])
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError([f"cannot write '{target}': permission denied"])
    return target


def write_predictions(
    model: InferenceModel,
    batches: Batches,
    path: str | os.PathLike[str],
    task_names: Sequence[str] | None = None,
    id_field: str | None = None,
    file_format: str | None = None,
    progress: bool = False,
    total: int | None = None,
    allow_missing: bool = False,
) -> int:
    """Write the predictions of ``task_names`` (default: every task) on ``batches`` to a file.

    Args:
        model: The model.
        batches: ``(X_dict, Y_dict)`` batches (a loader; ``Y_dict`` may be empty, it is unused).
        path: The file (``.jsonl``, ``.csv`` or ``.parquet``); its directory must exist.
        task_names: The tasks to predict; only their operations run.
        id_field: A field of the batches holding each row's id (a list of names, a tensor);
            default: the row number, from 0.
        file_format: ``"jsonl"``, ``"csv"`` or ``"parquet"`` (default: from the suffix).
        progress: Show a progress bar (on a terminal only).
        total: Rows expected, for the progress bar.
        allow_missing: A row with a non-finite input (NaN, an infinity) gets null predictions
            and its reason in a ``missing`` column (written for every row, null when the row
            has predictions), instead of an error.

    Returns:
        The number of rows written.

    Raises:
        ConfigError: An unknown format, or a path that cannot be written; nothing is written.
        DataError: A non-finite input without ``allow_missing``, naming the row and the field;
            nothing is written.

    Example:
        >>> import json, tempfile, pathlib, torch
        >>> from torch import nn
        >>> from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
        >>> model = MultitaskClassifier(
        ...     [Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])]
        ... )
        >>> new = DictDataLoader(DictDataset("new", "serve", {"x": torch.randn(5, 2)}, {}), 2)
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "preds.jsonl"
        >>> write_predictions(model, new, out)
        5
        >>> row = json.loads(out.read_text().splitlines()[0])
        >>> list(row), len(row["t/probs"])
        (['id', 't/pred', 't/probs'], 3)
    """
    target = check_output_path(path)
    fmt = prediction_format(path, file_format)
    if fmt == "parquet":
        import_pyarrow()
    names = list(task_names) if task_names is not None else model.task_names
    rows = iter_prediction_rows(model, batches, names, id_field, allow_missing)
    return _write(target, fmt, rows, progress, total)


def _write(
    target: Path,
    fmt: str,
    rows: Iterable[tuple[list[Any], Columns, Missing]],
    progress: bool,
    total: int | None,
) -> int:
    from tqdm.auto import tqdm

    count = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal count
        writer = _WRITERS[fmt](fh)
        with tqdm(total=total, unit="rows", disable=None if progress else True) as bar:
            for ids, columns, missing in rows:
                writer.write(ids, columns, missing)
                count += len(ids)
                bar.update(len(ids))
        writer.close()

    atomic_write(target, write)
    return count


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back a JSON Lines prediction file (a list of rows; for tests and small files)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
