"""Prediction data: new rows for a trained model, read through one dispatch point.

Used by ``mtlgraph predict`` (:mod:`mtlgraph.experiment.inference_cli`, docs/inference.md).

Every kind of prediction data goes through ONE dispatch point, :func:`read_prediction_data`:
it picks a reader from :data:`READERS` by format (``--format``, else the file's suffix, else
what a directory holds) and the reader returns a :class:`PredictionData`, a source of
``(ids, {field: array})`` chunks. Labels are never read. A field is looked up in the data under
its own name first, then under each column or array a dataset of the config maps to it
(``data.datasets.<name>.fields``), so the training config's column names work unchanged.

Readers today: ``npz``, ``npy`` (one array, or a directory of ``<field>.npy`` files,
memory-mapped), ``csv``, ``jsonl`` (numbers, or lists of numbers per cell), ``parquet`` (needs
the ``tables`` extra) and ``dataset`` (``--data NAME[:SPLIT]``: a dataset of the config itself,
through :func:`~mtlgraph.experiment.build.load_datasets`, whatever its source).

A config dataset declared with a file ``source`` (table text, images, shards) is read through
that declaration by :mod:`mtlgraph.experiment.predict_sources` (the run's vocabulary, the
declared image transforms, file names as ids), chosen here too.

**Where new formats plug in**: add a reader ``read(path, fields, id_column) -> PredictionData``
to :data:`READERS` under its format name, and teach :func:`data_format` to recognise its files
or directories. A reader that has per-example file names uses them as ids.
"""

from __future__ import annotations

import copy
import csv
import glob
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import Batch
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.experiment.config import ExperimentConfig

ID_FIELD = "__id__"
"""The batch field that carries each row's id to the prediction writer."""

Chunk = tuple[list[Any], dict[str, Any]]
"""A chunk of rows: their ids and ``field -> array`` (a row per id; also a tensor, or a list of
1-D id tensors for a text field)."""

Specs = dict[str, list[str | list[str]]]
"""Field -> where it may be found: its own name, then the config's columns/arrays for it."""


@dataclass
class PredictionData:
    """Rows of new data, read in chunks.

    Attributes:
        source: The data, for messages (``"'new.csv'"``).
        rows: Number of rows, when known without reading the data.
        chunks: ``chunks(size)`` yields :data:`Chunk` s of at most ``size`` rows, in order.
    """

    source: str
    rows: int | None
    chunks: Callable[[int], Iterator[Chunk | Callable[[], Chunk]]]

    def batches(self, batch_size: int, num_workers: int = 0) -> Iterable[Batch]:
        """``(X_dict, {})`` batches of tensors; ``X_dict[ID_FIELD]`` holds the ids.

        With ``num_workers > 0`` the chunks are read in worker processes (each reads every
        ``num_workers``-th chunk), still in order.
        """
        if num_workers <= 0:
            return (chunk_batch(c) for c in self.chunks(batch_size))
        dataset = _ChunkDataset(self.chunks, batch_size, num_workers)
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity
        )


def _identity(batch: Any) -> Any:
    return batch


def chunk_batch(chunk: Chunk | Callable[[], Chunk]) -> Batch:
    """A chunk as a batch: arrays become tensors, lists of 1-D id tensors (tokenised text) are
    padded with a ``<field>_mask``; a callable chunk (decoded images) is read first."""
    from mtlgraph.data.datasets import MASK_SUFFIX, pad_sequences

    ids, arrays = chunk() if callable(chunk) else chunk
    X: dict[str, Any] = {}
    for f, a in arrays.items():
        if isinstance(a, torch.Tensor):
            X[f] = a
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            X[f], X[f + MASK_SUFFIX] = pad_sequences(a)
        else:
            X[f] = torch.from_numpy(np.array(a))
    X[ID_FIELD] = ids
    return X, {}


class _ChunkDataset(torch.utils.data.IterableDataset[Batch]):
    def __init__(
        self,
        chunks: Callable[[int], Iterator[Chunk | Callable[[], Chunk]]],
        size: int,
        workers: int,
    ) -> None:
        self.chunks, self.size, self.workers = chunks, size, workers

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for i, chunk in enumerate(self.chunks(self.size)):
            if i % self.workers == worker:
                yield chunk_batch(chunk)


# ---------------------------------------------------------------- field lookup


def field_specs(cfg: ExperimentConfig, fields: Sequence[str]) -> Specs:
    """Where each field may be found: its own name, then each column/array the config's
    datasets read it from."""
    out: Specs = {}
    for f in fields:
        specs: list[str | list[str]] = [f]
        for ds in cfg.data.datasets.values():
            spec = ds.fields.get(f)
            if spec is not None and spec not in specs:
                specs.append(spec)
        out[f] = specs
    return out


def resolve_columns(
    specs: Specs, available: Sequence[str], source: str, kind: str = "column"
) -> dict[str, str | list[str]]:
    """The column (or columns) each field is read from.

    Raises:
        DataError: Every field with no column, naming the field, the file and what it has.
    """
    have = set(available)
    chosen: dict[str, str | list[str]] = {}
    problems = []
    for f, options in specs.items():
        for spec in options:
            names = [spec] if isinstance(spec, str) else spec
            if all(n in have for n in names):
                chosen[f] = spec
                break
        else:
            looked = quoted(dict.fromkeys(n for s in options for n in _names(s)))
            problems.append(
                f"{source} has no {kind} for input field '{f}' (looked for {looked})"
                f"{did_you_mean(f, available)}; it has {quoted(available) or 'nothing'}"
            )
    if problems:
        raise DataError(problems, header=f"cannot read {source}:" if len(problems) > 1 else None)
    return chosen


def _names(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _check_id(id_column: str | None, available: Sequence[str], source: str, kind: str) -> None:
    if id_column is not None and id_column not in available:
        raise DataError(
            [
                f"{source} has no id {kind} '{id_column}'{did_you_mean(id_column, available)}; "
                f"it has {quoted(available)}"
            ]
        )


def _as_field(values: Sequence[Any] | np.ndarray, what: str, start: int) -> np.ndarray:
    """A column's cells as a field array: numbers become ``(N, 1)``, lists ``(N, L...)``;
    numbers as float32 (as training from a table reads them)."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        try:
            array = np.stack([np.asarray(v, dtype=np.float32) for v in values])
        except (ValueError, TypeError):
            shapes = [np.shape(v) for v in values]
            i = next(i for i, s in enumerate(shapes) if s != shapes[0])
            raise DataError(
                [
                    f"{what} holds values of different shapes: {shapes[0]} in row {start} but "
                    f"{shapes[i]} in row {start + i} (rows count from 0); every row of a field "
                    "needs the same shape"
                ]
            ) from None
    return array[:, None] if array.ndim == 1 else array


def _stack(
    columns: Mapping[str, Sequence[Any] | np.ndarray],
    spec: str | list[str],
    source: str,
    start: int,
) -> np.ndarray:
    return np.concatenate(
        [_as_field(columns[n], f"column '{n}' of {source}", start) for n in _names(spec)], axis=1
    )


# ---------------------------------------------------------------- readers


def _read_npz(path: Path, specs: Specs, id_column: str | None) -> PredictionData:
    source = f"'{path}'"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return _from_arrays(arrays, specs, id_column, source, "array")


def _from_arrays(
    arrays: Mapping[str, np.ndarray],
    specs: Specs,
    id_column: str | None,
    source: str,
    kind: str,
) -> PredictionData:
    chosen = resolve_columns(specs, list(arrays), source, kind)
    _check_id(id_column, list(arrays), source, kind)
    fields = {f: _array_field(arrays, spec) for f, spec in chosen.items()}
    lengths = {f: len(a) for f, a in fields.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{f}: {n}" for f, n in lengths.items())
        raise DataError([f"{source}: the input fields have different lengths ({listing})"])
    n = next(iter(lengths.values()), 0)
    ids = arrays[id_column] if id_column is not None else None

    def chunks(size: int) -> Iterator[Chunk]:
        for start in range(0, n, size):
            stop = min(n, start + size)
            row_ids = ids[start:stop].tolist() if ids is not None else list(range(start, stop))
            yield row_ids, {f: _float32(a[start:stop]) for f, a in fields.items()}

    return PredictionData(source, n, chunks)


def _array_field(arrays: Mapping[str, np.ndarray], spec: str | list[str]) -> np.ndarray:
    if isinstance(spec, str):
        return arrays[spec]
    return np.stack([arrays[n] for n in spec], axis=1)


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def _read_npy(path: Path, specs: Specs, id_column: str | None) -> PredictionData:
    """One ``.npy`` array (one field), or a directory of ``<name>.npy`` arrays, memory-mapped:
    a chunk reads only its rows."""
    if path.is_dir():
        source = f"directory '{path}'"
        names = sorted(p.stem for p in path.glob("*.npy"))
        chosen = resolve_columns(specs, names, source, "array file (<name>.npy)")
        _check_id(id_column, names, source, "array file (<name>.npy)")
        needed = {n for spec in chosen.values() for n in _names(spec)} | {id_column} - {None}
        arrays = {
            str(n): np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in needed
        }
        return _from_arrays(
            arrays, {f: [spec] for f, spec in chosen.items()}, id_column, source, "array file"
        )
    if len(specs) != 1:
        raise DataError(
            [
                f"'{path}' holds one array, but the tasks read the fields {quoted(specs)}: give a "
                "directory of <field>.npy files, or a .npz file"
            ]
        )
    if id_column is not None:
        raise DataError([f"'{path}' holds one array and no id column '{id_column}'"])
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return _from_arrays({next(iter(specs)): array}, specs, None, f"'{path}'", "array")


def _csv_cell(cell: str, column: str, row: int, source: str) -> Any:
    text = cell.strip()
    try:
        if text.startswith("["):
            return json.loads(text)
        return float(text) if text else math.nan
    except ValueError:
        raise DataError(
            [f"column '{column}' of {source} holds {cell!r} in data row {row + 1}, not a number"]
        ) from None


def _read_csv(path: Path, specs: Specs, id_column: str | None) -> PredictionData:
    source = f"'{path}'"
    with path.open(newline="") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    if not header:
        raise DataError([f"{source} is empty; the first row must name the columns"])
    chosen = resolve_columns(specs, header, source)
    _check_id(id_column, header, source, "column")
    used = list(dict.fromkeys(n for spec in chosen.values() for n in _names(spec)))
    index = {n: header.index(n) for n in [*used, *([id_column] if id_column else [])]}

    def chunks(size: int) -> Iterator[Chunk]:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            rows: list[list[str]] = []
            start = 0
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                rows.append(row)
                if len(rows) == size:
                    yield _csv_chunk(rows, start, chosen, index, id_column, source)
                    start, rows = start + len(rows), []
            if rows:
                yield _csv_chunk(rows, start, chosen, index, id_column, source)

    return PredictionData(source, None, chunks)


def _csv_chunk(
    rows: list[list[str]],
    start: int,
    chosen: Mapping[str, str | list[str]],
    index: Mapping[str, int],
    id_column: str | None,
    source: str,
) -> Chunk:
    columns = {}
    for name, j in index.items():
        if name == id_column:
            continue
        columns[name] = [
            _csv_cell(r[j] if j < len(r) else "", name, start + i, source)
            for i, r in enumerate(rows)
        ]
    ids: list[Any] = (
        [r[index[id_column]].strip() for r in rows]
        if id_column is not None
        else list(range(start, start + len(rows)))
    )
    return ids, {f: _stack(columns, spec, source, start) for f, spec in chosen.items()}


def _read_jsonl(path: Path, specs: Specs, id_column: str | None) -> PredictionData:
    source = f"'{path}'"
    first: dict[str, Any] | None = None
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                first = _json_row(line, 1, source)
                break
    if first is None:
        raise DataError([f"{source} holds no rows"])
    chosen = resolve_columns(specs, list(first), source, "key")
    _check_id(id_column, list(first), source, "key")
    used = list(dict.fromkeys(n for spec in chosen.values() for n in _names(spec)))

    def chunks(size: int) -> Iterator[Chunk]:
        rows: list[dict[str, Any]] = []
        start = 0
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = _json_row(line, line_no, source)
                missing = [n for n in [*used, *([id_column] if id_column else [])] if n not in row]
                if missing:
                    raise DataError([f"line {line_no} of {source} has no key {quoted(missing)}"])
                rows.append(row)
                if len(rows) == size:
                    yield _json_chunk(rows, start, chosen, used, id_column, source)
                    start, rows = start + len(rows), []
        if rows:
            yield _json_chunk(rows, start, chosen, used, id_column, source)

    return PredictionData(source, None, chunks)


def _json_row(line: str, line_no: int, source: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError([f"line {line_no} of {source} is not JSON: {e}"]) from None
    if not isinstance(row, dict):
        raise DataError([f"line {line_no} of {source} is not a JSON object"])
    return row


def _json_chunk(
    rows: list[dict[str, Any]],
    start: int,
    chosen: Mapping[str, str | list[str]],
    used: Sequence[str],
    id_column: str | None,
    source: str,
) -> Chunk:
    columns = {n: [r[n] for r in rows] for n in used}
    ids = (
        [r[id_column] for r in rows]
        if id_column is not None
        else list(range(start, start + len(rows)))
    )
    return ids, {f: _stack(columns, spec, source, start) for f, spec in chosen.items()}


def _read_parquet(path: Path, specs: Specs, id_column: str | None) -> PredictionData:
    from mtlgraph.inference.predictions import import_pyarrow

    _, pq = import_pyarrow("reading Parquet")
    source = f"'{path}'"
    parquet = pq.ParquetFile(path)
    names = list(parquet.schema_arrow.names)
    chosen = resolve_columns(specs, names, source)
    _check_id(id_column, names, source, "column")
    used = list(dict.fromkeys(n for spec in chosen.values() for n in _names(spec)))
    read = [*used, *([id_column] if id_column and id_column not in used else [])]

    def chunks(size: int) -> Iterator[Chunk]:
        start = 0
        for record in pq.ParquetFile(path).iter_batches(batch_size=size, columns=read):
            n = record.num_rows
            columns = {c: record.column(c).to_numpy(zero_copy_only=False) for c in used}
            ids = (
                record.column(id_column).to_pylist()
                if id_column is not None
                else list(range(start, start + n))
            )
            start += n
            yield ids, {f: _stack(columns, spec, source, start - n) for f, spec in chosen.items()}

    return PredictionData(source, parquet.metadata.num_rows, chunks)


def _read_dataset(cfg: ExperimentConfig, ref: str, specs: Specs) -> PredictionData:
    """``NAME`` (every split) or ``NAME:SPLIT``: a dataset of the config, labels ignored."""
    from mtlgraph.experiment.build import load_datasets

    name, _, split = ref.partition(":")
    one = copy.copy(cfg)
    one.data = copy.copy(cfg.data)
    one.data.datasets = {name: cfg.data.datasets[name]}
    datasets = [d for d in load_datasets(one)[0] if not split or d.split == split]
    if not datasets:
        have = quoted(d.split for d in load_datasets(one)[0])
        raise DataError([f"dataset '{name}' has no split '{split}'; it has {have}"])
    source = f"dataset '{ref}' of the config"
    resolve_columns({f: [f] for f in specs}, list(datasets[0].X_dict), source, "field")

    def chunks(size: int) -> Iterator[Chunk]:
        for ds in datasets:
            for start in range(0, len(ds), size):
                X, _ = ds.batch(slice(start, start + size))
                n = len(next(iter(X.values())))
                rows = range(start, start + n)
                ids = list(rows) if split else [f"{ds.split}/{i}" for i in rows]
                yield ids, {f: np.asarray(X[f]) for f in specs}

    return PredictionData(source, sum(len(d) for d in datasets), chunks)


Reader = Callable[[Path, Specs, "str | None"], PredictionData]

READERS: dict[str, Reader] = {
    "npz": _read_npz,
    "npy": _read_npy,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}
"""Prediction data readers by format name: where new sources (images, shards) plug in."""

_SUFFIXES = {".ndjson": "jsonl", ".pq": "parquet"}


def data_format(path: Path, file_format: str | None = None) -> str:
    """The reader for ``path``: ``file_format``, else the suffix, else a directory's ``.npy``
    files.

    Raises:
        ConfigError: An unknown format, or files whose format cannot be told.
    """
    if file_format is not None:
        if file_format not in READERS:
            raise ConfigError(
                [
                    f"unknown data format '{file_format}'{did_you_mean(file_format, READERS)}; "
                    f"choose one of {quoted(READERS)}"
                ]
            )
        return file_format
    if path.is_dir():
        if any(path.glob("*.npy")):
            return "npy"
        raise ConfigError([f"cannot tell the format of directory '{path}': it has no .npy files"])
    suffix = path.suffix.lower()
    fmt = _SUFFIXES.get(suffix, suffix.lstrip("."))
    if fmt not in READERS:
        raise ConfigError(
            [
                f"cannot tell the format of '{path}' from its suffix; use one of "
                f"{quoted('.' + f for f in READERS)} or pass --format"
            ]
        )
    return fmt


def read_prediction_data(
    cfg: ExperimentConfig,
    path: str | Path,
    fields: Sequence[str],
    id_column: str | None = None,
    file_format: str | None = None,
    run_dir: str | Path | None = None,
) -> PredictionData:
    """THE dispatch point for prediction data: a file, a directory or a config dataset.

    When the config dataset declaring ``fields`` has a file ``source`` (table, images, shards),
    a table file, image folder or glob is read through that declaration
    (:mod:`mtlgraph.experiment.predict_sources`): text with the run's saved vocabulary, images
    decoded as declared.

    Args:
        cfg: The experiment config (its datasets say which columns hold which field).
        path: A data file, directory or glob, or ``NAME[:SPLIT]`` naming a dataset of the config.
        fields: The input fields to read (those the chosen tasks read).
        id_column: A column/array/key holding each row's id (default: the row number).
        file_format: A key of :data:`READERS` (default: from the path).
        run_dir: The run directory (its ``vocab/`` holds the vocabularies of text fields).

    Raises:
        DataError: A missing file, field, id column or vocabulary (named, with what the data
            has).
        ConfigError: An unknown format.
    """
    from mtlgraph.experiment import predict_sources as ps

    specs = field_specs(cfg, fields)
    run = Path(run_dir) if run_dir is not None else None
    source = ps.source_dataset(cfg, fields) if file_format is None else None
    p = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    if not p.exists():
        name = str(path).partition(":")[0]
        if name in cfg.data.datasets and file_format in (None, "dataset"):
            if cfg.data.datasets[name].source is not None:
                return ps.read_source_dataset(cfg, str(path), fields, run)
            return _read_dataset(cfg, str(path), specs)
        if source is not None and glob.has_magic(str(path)):
            return ps.read_source_data(cfg, source, path, fields, id_column, run)
        hint = did_you_mean(name, cfg.data.datasets)
        raise DataError(
            [
                f"--data {path}: no such file or directory, nor a dataset of the config{hint} "
                f"(it has {quoted(cfg.data.datasets)}; write NAME or NAME:SPLIT)"
            ]
        )
    if source is not None and _source_reads(cfg, source, Path(path)):
        return ps.read_source_data(cfg, source, path, fields, id_column, run)
    return READERS[data_format(Path(path), file_format)](Path(path), specs, id_column)


def _source_reads(cfg: ExperimentConfig, name: str, path: Path) -> bool:
    """Whether dataset ``name``'s source reads ``path``: a table file, or an image folder."""
    src = cfg.data.datasets[name].source
    assert src is not None
    if path.is_dir():
        return src.type == "images"
    return src.format is not None or path.suffix.lower() in (
        ".csv",
        ".jsonl",
        ".ndjson",
        ".parquet",
        ".pq",
    )
