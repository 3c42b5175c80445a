"""Prediction data: new rows for a trained model, read as training reads them, labels dropped.

One dispatch point, :func:`read_prediction_data`, for ``mtlgraph predict`` (docs/inference.md).
"""

from __future__ import annotations

import copy
import functools
import glob
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import MASK_SUFFIX, Batch, DictDataset, collate_dicts, pad_sequences
from mtlgraph.data.sources.files import (
    SUFFIXES,
    Table,
    iter_table,
    read_table,
    table_format,
    table_length,
)
from mtlgraph.data.sources.shards import shard_files
from mtlgraph.data.sources.table import Tokenizer, field_values
from mtlgraph.data.sources.tokenizer import TOKENIZERS, load_tokenizer, verify_fingerprint
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.experiment.config import ExperimentConfig
from mtlgraph.experiment.data_config import DatasetConfig
from mtlgraph.experiment.sources import image_decoder, vocab_file
from mtlgraph.signals import ignore_stop_signals

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files of a folder read as images by ``--data FOLDER``."""

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
        """``(X_dict, {})`` batches in order (``X_dict[ID_FIELD]``: the ids); with
        ``num_workers > 0`` worker processes read every ``num_workers``-th chunk."""
        if num_workers <= 0:
            return (chunk_batch(c) for c in self.chunks(batch_size))
        dataset = _ChunkDataset(self.chunks, batch_size, num_workers)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
            worker_init_fn=ignore_stop_signals,
        )


def _identity(batch: Any) -> Any:
    return batch


def chunk_batch(chunk: Chunk | Callable[[], Chunk]) -> Batch:
    """A chunk as a batch: arrays become tensors, lists of 1-D id tensors (tokenised text) are
    padded with a ``<field>_mask``; a callable chunk (decoded images) is read first."""
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
    specs: Specs, available: Sequence[str], source: str
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
            if all(n in have for n in _names(spec)):
                chosen[f] = spec
                break
        else:
            looked = quoted(dict.fromkeys(n for s in options for n in _names(s)))
            problems.append(
                f"{source} has no column for input field '{f}' (looked for {looked})"
                f"{did_you_mean(f, available)}; it has {quoted(available) or 'nothing'}"
            )
    if problems:
        raise DataError(problems, header=f"cannot read {source}:" if len(problems) > 1 else None)
    return chosen


def _names(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _check_id(id_column: str | None, available: Sequence[str], source: str) -> None:
    if id_column is not None and id_column not in available:
        raise DataError(
            [
                f"{source} has no id column '{id_column}'{did_you_mean(id_column, available)}; "
                f"it has {quoted(available)}"
            ]
        )


def _id_values(table: Table, id_column: str | None, start: int) -> list[Any]:
    if id_column is None:
        return list(range(start, start + table_length(table)))
    return [
        v.item() if isinstance(v, np.generic) else v.strip() if isinstance(v, str) else v
        for v in table[id_column]
    ]


def declaring_dataset(cfg: ExperimentConfig, fields: Sequence[str]) -> str | None:
    """The first config dataset whose ``fields`` hold every field (its source says how new
    files are read: text columns, images)."""
    for name, ds in cfg.data.datasets.items():
        if fields and all(f in ds.fields for f in fields):
            return name
    return None


def vocabulary_files(
    cfg: ExperimentConfig, run_dir: Path | None, fields: Sequence[str]
) -> dict[str, str]:
    """``{field: vocabulary file}`` of the text fields among ``fields`` whose vocabulary the
    run saved (the export sidecar names them)."""
    out: dict[str, str] = {}
    if run_dir is None:
        return out
    for name, ds in cfg.data.datasets.items():
        text = ds.source.text
        for f in fields:
            column = ds.fields.get(f)
            if f in out or not isinstance(column, str) or column not in text:
                continue
            file = vocab_file(run_dir, name, column)
            if text[column].tokenizer is None and file.is_file():
                out[f] = str(file)
    return out


def checkpoint_vocabularies(checkpoint: str | Path) -> dict[str, str] | None:
    """``{dataset.column: fingerprint}`` of the vocabularies a training checkpoint was trained
    with; ``None`` for a file that does not say (a model file, a checkpoint of a run without
    a config)."""
    from mtlgraph.training.checkpoint import load_checkpoint

    experiment = (load_checkpoint(checkpoint).get("config") or {}).get("experiment")
    if not isinstance(experiment, dict):
        return None
    return {str(k): str(v) for k, v in (experiment.get("vocabularies") or {}).items()}


def verify_vocabularies(
    checkpoint: str | Path, built: Mapping[str, str], where: str = "this config"
) -> None:
    """Refuse vocabularies (``{dataset.column: fingerprint}``) that differ from the ones the
    checkpoint was trained with (``evaluate`` rebuilds them from the training split).

    Raises:
        DataError: Every vocabulary that differs, naming it, the checkpoint and the fix.
    """
    trained = checkpoint_vocabularies(checkpoint)
    if trained is None:
        if built:
            logger.warning(
                "'%s' does not record its vocabularies: cannot check that %s tokenises as "
                "training did",
                checkpoint,
                where,
            )
        return
    problems = [
        f"vocabulary '{key}': {where} builds {fp}, but '{checkpoint}' was trained with "
        f"{trained[key]}: the training data or the tokenizer settings changed since "
        "training; restore them, or train a new run"
        for key, fp in built.items()
        if key in trained and trained[key] != fp
    ]
    if problems:
        raise DataError(problems)


def export_declarations(
    cfg: ExperimentConfig, fields: Sequence[str]
) -> tuple[dict[str, int | None], dict[str, dict[str, Any]]]:
    """What an export's metadata says of ``fields`` beyond shapes, from the datasets declaring
    them: ``({text field: max length (None: a user tokenizer's)}, {image field: {"image":
    decoding}})`` (the vocabularies: :func:`vocabulary_files`)."""
    sequences: dict[str, int | None] = {}
    preprocessing: dict[str, dict[str, Any]] = {}
    for ds in cfg.data.datasets.values():
        for f in fields:
            column = ds.fields.get(f)
            if not isinstance(column, str) or f in sequences or f in preprocessing:
                continue
            tc = ds.source.text.get(column)
            if tc is not None:
                sequences[f] = tc.max_length if tc.tokenizer is None else None
            ic = ds.source.images
            if ic is not None and column == ic.column:
                norm = ic.normalize
                preprocessing[f] = {
                    "image": {
                        "mode": ic.mode,
                        "resize": list(ic.resize) if ic.resize else None,
                        "normalize": {"mean": norm.mean, "std": norm.std} if norm else None,
                        "scale": "8-bit pixels / 255, 16-bit grey / 65535, then normalize",
                        "layout": "CHW",
                    }
                }
    return sequences, preprocessing


def run_tokenizers(
    name: str,
    ds: DatasetConfig,
    columns: Sequence[str],
    run_dir: Path | None,
    fingerprints: Mapping[str, str] | None = None,
) -> dict[str, Tokenizer]:
    """The tokenizer of each text column among ``columns``: the declared one, or the run's
    saved vocabulary (never rebuilt), checked against the checkpoint's ``fingerprints``
    (``{dataset.column: fingerprint}``) when given.

    Raises:
        DataError: A vocabulary file the run directory lacks, or one whose fingerprint differs
            from the checkpoint's, naming the file.
    """
    out: dict[str, Tokenizer] = {}
    problems = []
    for column, tc in ds.source.text.items():
        if column not in columns:
            continue
        where = f"data.datasets.{name}.source.text.{column}"
        if tc.tokenizer is not None:
            out[column] = TOKENIZERS.build(tc.tokenizer, f"{where}.tokenizer")
            continue
        file = vocab_file(run_dir or Path("<run_dir>"), name, column)
        if run_dir is None or not file.is_file():
            problems.append(
                f"{where}: text column '{column}' needs the run's vocabulary '{file}', which "
                "does not exist; pass the run directory the model was trained in as --checkpoint"
            )
            continue
        out[column] = load_tokenizer(file)
        expected = (fingerprints or {}).get(f"{name}.{column}")
        if expected is not None:
            try:
                verify_fingerprint(out[column], expected, file)
            except DataError as e:
                problems += e.problems
    if problems:
        raise DataError(problems)
    return out


def _columns(ds: DatasetConfig, fields: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(c for f in fields for c in _names(ds.fields[f])))


def _files(path: str | Path) -> list[Path]:
    if glob.has_magic(str(path)):
        return shard_files(str(path), Path.cwd())
    return [Path(path)]


def _file_format(file: Path, given: str | None, declared: str | None) -> str:
    """``--format``, else the suffix, else the declaring dataset's format."""
    if given is None and file.suffix.lstrip(".").lower() not in SUFFIXES and not file.is_dir():
        given = declared
    return table_format(file, given)


def _read_files(
    cfg: ExperimentConfig,
    path: str | Path,
    fields: Sequence[str],
    id_column: str | None,
    file_format: str | None,
    run_dir: Path | None,
    allow_missing: bool = False,
    fingerprints: Mapping[str, str] | None = None,
) -> PredictionData:
    """Table files (one, or a glob), read in chunks through :mod:`mtlgraph.data.sources`;
    ``allow_missing`` lets non-finite cells through (the writer flags their rows)."""
    files = _files(path)
    name = declaring_dataset(cfg, fields)
    ds = cfg.data.datasets[name] if name is not None else None
    declared = ds.source.file_format() if ds is not None else None
    formats = [_file_format(f, file_format, declared) for f in files]
    source = f"'{path}'" if len(files) == 1 else f"{len(files)} files matching '{path}'"
    first = next(iter_table(files[0], formats[0], rows=1), Table())
    available = list(first)
    if len(files) == 1 and table_length(first) == 0:
        raise DataError([_no_rows(source, formats[0], available)])
    specs = field_specs(cfg, fields)
    if formats[0] == "npy" and files[0].is_file():  # one array: the one field
        if len(fields) != 1 or id_column is not None:
            raise DataError(
                [
                    f"{source} holds one array, but the tasks read the fields {quoted(fields)}"
                    f"{' and an id column' if id_column else ''}: give a directory of "
                    "<field>.npy files, or a .npz file"
                ]
            )
        specs = {fields[0]: [available[0]]}
    chosen = resolve_columns(specs, available, f"'{files[0]}'")
    _check_id(id_column, available, f"'{files[0]}'")
    text_columns = [s for s in chosen.values() if isinstance(s, str)]
    toks = run_tokenizers(name, ds, text_columns, run_dir, fingerprints) if name and ds else {}
    needed = [*dict.fromkeys(n for s in chosen.values() for n in _names(s))]
    needed += [id_column] if id_column and id_column not in needed else []

    def chunks(size: int) -> Iterator[Chunk]:
        start = 0
        for file, fmt in zip(files, formats, strict=True):
            for table in iter_table(file, fmt, needed, size):
                n = table_length(table)
                if n == 0:
                    continue
                X = {
                    f: field_values(table, spec, text=toks, finite=not allow_missing)
                    for f, spec in chosen.items()
                }
                yield _id_values(table, id_column, start), X
                start += n

    return PredictionData(source, None, chunks)


def _no_rows(source: str, fmt: str, columns: Sequence[str]) -> str:
    """The refusal of a data file without rows (a 0-byte CSV is the reader's own error)."""
    has = f"has a header ({quoted(columns)}) and no rows" if fmt == "csv" else "has no rows"
    return f"{source} {has}: nothing to predict; give data with at least one row"


def _read_images(
    cfg: ExperimentConfig,
    name: str,
    path: Path,
    fields: Sequence[str],
    id_column: str | None,
    run_dir: Path | None,
    fingerprints: Mapping[str, str] | None = None,
) -> PredictionData:
    """A folder of images (every image in it, sorted; ids are the file names) or a table
    naming the files (relative to its folder), read by training's :class:`ImageFolder`."""
    from mtlgraph.data.sources.images import ImageFolder, require_pillow

    ds = cfg.data.datasets[name]
    ic = ds.source.images
    assert ic is not None
    require_pillow("predicting on images")
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError([f"--data {path}: no image files ({', '.join(IMAGE_SUFFIXES)})"])
        table = Table({ic.column: np.asarray(files, dtype=object)}, f"'{path}'")
        folder = path
    else:
        fmt = _file_format(path, None, ds.source.format)
        table, folder = read_table(path, fmt), path.parent
    image_fields = [f for f in fields if ds.fields[f] == ic.column]
    others = {f: ds.fields[f] for f in fields if f not in image_fields}
    toks = run_tokenizers(name, ds, _columns(ds, list(others)), run_dir, fingerprints)
    images = ImageFolder(
        folder,
        table,
        ID_FIELD,
        ic.column,
        others,
        {},
        image_decoder(ic, Path(cfg.base_dir)),
        toks,
        table.origin,
    )
    _check_id(id_column, list(table), table.origin)
    ids = images.files if id_column is None else _id_values(table, id_column, 0)

    def chunks(size: int) -> Iterator[Callable[[], Chunk]]:
        for rows in _row_ranges(len(images), size):
            yield functools.partial(_image_chunk, images, rows, ids, image_fields)

    return PredictionData(table.origin, len(images), chunks)


def _image_chunk(images: Any, rows: range, ids: Sequence[Any], image_fields: list[str]) -> Chunk:
    """Rows of an image folder, decoded (called in the worker that reads the chunk)."""
    X, _ = collate_dicts([images[i] for i in rows])
    decoded = X.pop(images.image_field)  # given to each field that reads the image column
    return [ids[i] for i in rows], {**X, **dict.fromkeys(image_fields, decoded)}


def read_config_dataset(
    cfg: ExperimentConfig,
    ref: str,
    fields: Sequence[str],
    run_dir: Path | None,
    fingerprints: Mapping[str, str] | None = None,
) -> PredictionData:
    """``--data NAME[:SPLIT]``: a dataset of the config, labels ignored; ids are row numbers
    (``split/row`` for every split) or, for images, file names."""
    from mtlgraph.experiment.sources import load_datasets

    name, _, split = ref.partition(":")
    ds = cfg.data.datasets[name]
    unknown = [f for f in fields if f not in ds.fields]
    if unknown:
        raise DataError([f"dataset '{ref}' of the config has no input field {quoted(unknown)}"])
    run_tokenizers(name, ds, _columns(ds, fields), run_dir, fingerprints)
    one = copy.copy(cfg)
    one.data = copy.copy(cfg.data)
    one.data.datasets = {name: ds}
    found = load_datasets(one, run_dir).datasets
    chosen = [d for d in found if not split or d.split == split]
    if not chosen:
        raise DataError(
            [f"dataset '{name}' has no split '{split}'; it has {quoted(d.split for d in found)}"]
        )

    def chunks(size: int) -> Iterator[Chunk]:
        for d in chosen:
            for ids, X in _dataset_chunks(d, size):
                keep = {
                    f: v for f, v in X.items() if f in fields or f[: -len(MASK_SUFFIX)] in fields
                }
                yield [i if split else f"{d.split}/{i}" for i in ids], keep

    rows = sum(len(d) for d in chosen) if all(isinstance(d, DictDataset) for d in chosen) else None
    return PredictionData(f"dataset '{ref}' of the config", rows, chunks)


def _dataset_chunks(d: Any, size: int) -> Iterator[Chunk]:
    """``(ids, X)`` chunks of a built dataset, in order: row numbers (image file names)."""
    from mtlgraph.data.sources.images import ImageFolder

    inner = getattr(d, "dataset", d)
    if isinstance(d, DictDataset):
        for rows in _row_ranges(len(d), size):
            yield list(rows), dict(d.batch(slice(rows.start, rows.stop))[0])
    elif isinstance(inner, ImageFolder):
        for rows in _row_ranges(len(inner), size):
            yield _image_chunk(inner, rows, inner.files, [inner.image_field])
    else:  # a stream: in file order (training shuffles its split)
        stream = copy.copy(inner)
        if hasattr(stream, "shuffle"):
            stream.shuffle = False
        rows_of = iter(stream)
        start = 0
        while examples := list(itertools.islice(rows_of, size)):
            X, _ = collate_dicts([(x, {}) for x, _y in examples])
            yield list(range(start, start + len(examples))), dict(X)
            start += len(examples)


def _row_ranges(n: int, size: int) -> Iterator[range]:
    """``range`` s of at most ``size`` rows covering ``0..n-1``, in order."""
    return (range(start, min(start + size, n)) for start in range(0, n, size))


def read_prediction_data(
    cfg: ExperimentConfig,
    path: str | Path,
    fields: Sequence[str],
    id_column: str | None = None,
    file_format: str | None = None,
    run_dir: str | Path | None = None,
    allow_missing: bool = False,
    fingerprints: Mapping[str, str] | None = None,
) -> PredictionData:
    """THE dispatch point for prediction data: ``path`` is a data file, a directory of ``.npy``
    files or images, a glob, or ``NAME[:SPLIT]`` naming a dataset of the config, read as
    training reads it (labels dropped); ``id_column`` (default: the row number) names each row.
    A non-finite cell of a data file is an error naming the file, the line and the column, or,
    with ``allow_missing``, read as it is (the writer answers its row with nulls). The run's
    vocabularies are checked against ``fingerprints`` (:func:`checkpoint_vocabularies`).

    Raises:
        DataError: A missing file, field, id column or vocabulary (named, with what the data
            has), a bad row (file, line, column), an unknown ``file_format``.
    """
    run = Path(run_dir) if run_dir is not None else None
    # a padded text field's mask (text_mask beside text) comes with the field, from no column
    fields = [
        f for f in fields if not (f.endswith(MASK_SUFFIX) and f[: -len(MASK_SUFFIX)] in fields)
    ]
    if file_format is not None:
        table_format(path, file_format)  # an unknown format: the reader's own DataError
    p = Path(path)
    if not p.exists() and not glob.has_magic(str(path)):
        name = str(path).partition(":")[0]
        if name in cfg.data.datasets:
            return read_config_dataset(cfg, str(path), fields, run, fingerprints)
        hint = did_you_mean(name, cfg.data.datasets)
        raise DataError(
            [
                f"--data {path}: no such file or directory, nor a dataset of the config{hint} "
                f"(it has {quoted(cfg.data.datasets)}; write NAME or NAME:SPLIT)"
            ]
        )
    declaring = declaring_dataset(cfg, fields)
    images = declaring is not None and cfg.data.datasets[declaring].source.type == "images"
    if declaring is not None and images and p.suffix.lower() not in IMAGE_SUFFIXES:
        return _read_images(cfg, declaring, p, fields, id_column, run, fingerprints)
    if p.is_dir() and not any(p.glob("*.npy")):
        raise ConfigError([f"cannot tell the format of directory '{p}': it has no .npy files"])
    return _read_files(cfg, path, fields, id_column, file_format, run, allow_missing, fingerprints)
