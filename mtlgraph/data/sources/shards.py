"""Table shards streamed one file at a time: data that does not fit in memory.

A :class:`ShardStream` is an :class:`~mtlgraph.data.streams.ExampleStream` whose units are
table files (CSV, JSON Lines, Parquet); only the file being read is in memory.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph.data.sources.files import (
    Table,
    iter_table,
    parquet_rows,
    read_table,
    table_format,
    table_length,
)
from mtlgraph.data.sources.table import Tokenizer, table_columns
from mtlgraph.data.streams import Example, ExampleStream
from mtlgraph.exceptions import DataError


def shard_files(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str] = ".",
) -> list[Path]:
    """The files of a glob, a file or a list of them (relative to ``base``), each glob sorted.

    Raises:
        DataError: A glob that matches nothing or a listed file that does not exist.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[Path] = []
    problems = []
    for item in items:
        p = Path(item) if Path(item).is_absolute() else Path(base) / item
        if glob.has_magic(str(item)):
            found = sorted(Path(f) for f in glob.glob(str(p)))
            if not found:
                problems.append(f"no file matches '{item}' (looked in '{Path(base)}')")
            out += found
        elif not p.is_file():
            problems.append(f"shard '{item}' does not exist (looked for {p})")
        else:
            out.append(p)
    if problems:
        raise DataError(problems)
    if not out:
        raise DataError(["no shards: give a glob, a file or a list of files"])
    return out


class ShardStream(ExampleStream):
    """Rows of table files, streamed one file (a unit) at a time.

    Args:
        files: The shard files (see :func:`shard_files` for globs).
        fields: Input field -> column (or list of numeric columns), as for
            :func:`~mtlgraph.data.sources.table_dataset`.
        labels: Task name -> label column.
        text: Column -> tokenizer (``str -> ids``) for text fields.
        fmt: ``"csv"``, ``"jsonl"`` or ``"parquet"``; ``None`` = from each file's suffix.
        shuffle: Shuffle the rows within a file, in an order fixed by the stream's seed (the
            loader's seed, the pass and the file).
        labels_as: ``(task, labels, table) -> labels`` as the task needs them (the YAML passes
            its tasks' rule: class ids, missing labels as the ignore value); ``None`` = as read
            (``int64`` for whole numbers, else ``float32`` with NaN for a missing label).

    Raises:
        DataError: While reading: a shard that disappeared or cannot be read, an absent column,
            a bad row or cell (each naming the file, the line and the column).

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.data.sources import ShardStream, shard_files
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     _ = (d / f"part-{i}.csv").write_text(f"x,y\\n{i}.5,{i}\\n{i}.25,{i}\\n")
        >>> stream = ShardStream(shard_files("part-*.csv", d), {"x": "x"}, {"t": "y"})
        >>> stream.num_units(), [(float(x["x"]), int(y["t"])) for x, y in stream]
        (2, [(0.5, 0), (0.25, 0), (1.5, 1), (1.25, 1)])
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        fields: Mapping[str, str | Sequence[str]],
        labels: Mapping[str, str],
        text: Mapping[str, Tokenizer] | None = None,
        fmt: str | None = None,
        shuffle: bool = False,
        labels_as: Callable[[str, torch.Tensor, Table], torch.Tensor] | None = None,
    ) -> None:
        self.files = [Path(f) for f in files]
        for f in self.files:
            table_format(f, fmt)  # an unknown suffix is an error now, not mid-run
        self.fields = dict(fields)
        self.labels = tuple(labels)
        self._label_columns = dict(labels)
        self.text = dict(text or {})
        self.fmt = fmt
        self.shuffle = shuffle
        self.labels_as = labels_as

    def num_units(self) -> int:
        return len(self.files)

    def num_examples(self) -> int | None:
        """Rows in one pass, when every shard is Parquet (from the file metadata); else ``None``
        (counting CSV or JSON Lines rows would read every file an extra time)."""
        if not all(table_format(f, self.fmt) == "parquet" for f in self.files):
            return None
        return sum(parquet_rows(f) for f in self.files)

    def file_problems(self) -> list[str]:
        """What shows in every shard without reading its rows (its header, schema or first
        row): a file gone, empty or broken, a column the fields or labels name but it lacks;
        each naming the file. One small read a shard: call it before a run, not per pass."""
        needed = [*self._label_columns.values()]
        for columns in self.fields.values():
            needed += [columns] if isinstance(columns, str) else list(columns)
        problems: list[str] = []
        for file in self.files:
            try:
                # the header and a first row; the reader closes the file when it is dropped
                next(iter_table(file, self.fmt, list(dict.fromkeys(needed)), rows=1), None)
            except DataError as e:
                problems += e.problems
        return problems

    def read_unit(self, unit: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
        """A whole shard as columns: ``(X, Y, rows)``."""
        file = self.files[unit]
        if not file.is_file():
            raise DataError(
                [
                    f"shard '{file}' (unit {unit} of {len(self.files)}) disappeared since the "
                    "stream was opened; restore it (a resumed run reads from its checkpoint) or "
                    "start a new run without it"
                ]
            )
        table = read_table(file, self.fmt)
        try:
            X, Y = table_columns(table, self.fields, self._label_columns, self.text)
        except DataError as e:
            raise DataError(e.problems, header=f"cannot read shard '{file}':") from e
        if self.labels_as is not None:
            Y = {task: self.labels_as(task, values, table) for task, values in Y.items()}
        return X, Y, table_length(table)

    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[Example]:
        X, Y, rows = self.read_unit(unit)
        order: Sequence[int] = range(rows)
        if self.shuffle:
            order = np.random.default_rng(seed).permutation(rows).tolist()
        for i in order[start:]:
            yield {k: v[i] for k, v in X.items()}, {k: v[i] for k, v in Y.items()}

    def __repr__(self) -> str:
        return f"ShardStream(files={len(self.files)}, X={list(self.fields)}, Y={list(self.labels)})"
