"""Prediction files: one row per example, an ``id`` column and each task's predictions, streamed
into JSON Lines, CSV or Parquet (columns: ``docs/inference.md``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch

from mtlgraph._io import atomic_write, import_extra
from mtlgraph._suggest import quoted
from mtlgraph.data.sources.files import SUFFIXES
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.graph.task import Task
from mtlgraph.inference.evaluation import iter_predictions
from mtlgraph.inference.protocol import Batches, InferenceModel

WRITE_FORMATS = ("jsonl", "csv", "parquet")
"""The formats :func:`write_predictions` writes (a file's suffix tells it as for the readers)."""

ID = "id"
"""Name of the id column."""

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
) -> Iterator[tuple[list[Any], Columns]]:
    """Per batch: the ids and the prediction columns (arrays with a row per example)."""
    start = 0
    for X, probs in iter_predictions(model, batches, task_names):
        n = len(next(iter(probs.values())))
        if id_field is not None:
            if id_field not in X:
                raise DataError(
                    [f"the batches have no id field '{id_field}'; they have {quoted(X)}"]
                )
            ids = _plain(X[id_field])
        else:
            ids = list(range(start, start + n))
        start += n
        columns: Columns = {}
        for task_name, p in probs.items():
            columns.update(task_columns(model.tasks[task_name], p))
        yield ids, columns


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


class _JsonLines:
    def __init__(self, fh: IO[bytes]) -> None:
        self.out = io.TextIOWrapper(fh, encoding="utf-8", newline="\n", write_through=False)

    def write(self, ids: list[Any], columns: Columns) -> None:
        keys = [json.dumps(k) for k in columns]
        arrays = list(columns.values())
        lines = []
        for i, id_ in enumerate(ids):
            parts = [f'"{ID}": {json.dumps(id_)}']
            for key, a in zip(keys, arrays, strict=True):
                v = a[i]
                text = (
                    "[" + ", ".join(_number(x) for x in v.reshape(-1)) + "]"
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

    def write(self, ids: list[Any], columns: Columns) -> None:
        flat = [pair for name, a in columns.items() for pair in _flat(name, a)]
        if self.header is None:
            self.header = [ID, *(name for name, _ in flat)]
            self.writer.writerow(self.header)
        cols = [a for _, a in flat]
        self.writer.writerows([str(id_), *(str(c[i]) for c in cols)] for i, id_ in enumerate(ids))

    def close(self) -> None:
        self.out.flush()
        self.out.detach()


class _Parquet:
    def __init__(self, fh: IO[bytes]) -> None:
        self.pa, pq = import_pyarrow()
        self.fh = fh
        self.pq = pq
        self.writer: Any = None

    def write(self, ids: list[Any], columns: Columns) -> None:
        pa = self.pa
        flat = [pair for name, a in columns.items() for pair in _flat(name, a)]
        table = pa.table({ID: pa.array(ids), **{key: pa.array(col) for key, col in flat}})
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
    def write(self, ids: list[Any], columns: Columns) -> None: ...

    def close(self) -> None: ...


_WRITERS: dict[str, Callable[[IO[bytes]], _Writer]] = {
    "jsonl": _JsonLines,
    "csv": _Csv,
    "parquet": _Parquet,
}


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """The output path, if it can be written: its directory exists and is writable, and it is
    not a directory itself.

    Raises:
        ConfigError: Why it cannot be written.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
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

    Returns:
        The number of rows written.

    Raises:
        ConfigError: An unknown format, or a path that cannot be written; nothing is written.

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
    rows = iter_prediction_rows(model, batches, names, id_field)
    return _write(target, fmt, rows, progress, total)


def _write(
    target: Path,
    fmt: str,
    rows: Iterable[tuple[list[Any], Columns]],
    progress: bool,
    total: int | None,
) -> int:
    from tqdm.auto import tqdm

    count = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal count
        writer = _WRITERS[fmt](fh)
        with tqdm(total=total, unit="rows", disable=None if progress else True) as bar:
            for ids, columns in rows:
                writer.write(ids, columns)
                count += len(ids)
                bar.update(len(ids))
        writer.close()

    atomic_write(target, write)
    return count


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back a JSON Lines prediction file (a list of rows; for tests and small files)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
