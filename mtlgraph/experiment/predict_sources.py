"""Prediction data read through a dataset's declared file ``source`` (docs/inference.md).

When the config dataset that declares the predicted fields has a ``source:`` (``table``,
``images``, ``shards``; :mod:`mtlgraph.experiment.sources`), ``mtlgraph predict --data PATH``
reads the new file(s) with the same declaration, labels not needed:

- ``table`` / ``shards``: a table file, or a glob of them, read one file at a time; ``text``
  columns are tokenised with the RUN's saved vocabulary
  (``<run_dir>/vocab/<dataset>.<column>.json``) or the declared user tokenizer; ids are row numbers
  (counted across files) or ``--id-column``;
- ``images``: a folder of image files (every image in it, sorted; the ids are the file names) or a
  table naming the files (relative to the table's folder), decoded, resized and normalised as
  declared; images are decoded batch by batch.

``--data NAME[:SPLIT]`` for such a dataset builds it with
:func:`~mtlgraph.experiment.sources.load_sources` for the run directory (the run's vocabulary).
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtlgraph._suggest import quoted
from mtlgraph.data.sources.table import Table, Tokenizer, field_values, read_table
from mtlgraph.exceptions import DataError

if TYPE_CHECKING:
    from mtlgraph.experiment.config import DatasetConfig, ExperimentConfig
    from mtlgraph.experiment.predict import PredictionData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files of a folder read as images by ``--data FOLDER``."""


def source_dataset(cfg: ExperimentConfig, fields: Sequence[str]) -> str | None:
    """The first config dataset declared with a ``source`` whose ``fields`` hold every field."""
    for name, ds in cfg.data.datasets.items():
        if ds.source is not None and fields and all(f in ds.fields for f in fields):
            return name
    return None


def vocabulary_files(
    cfg: ExperimentConfig, run_dir: Path | None, fields: Sequence[str]
) -> dict[str, str]:
    """``{field: vocabulary file}`` of the text fields among ``fields`` whose vocabulary the
    run saved (the export sidecar names them)."""
    from mtlgraph.experiment.sources import _vocab_file

    out: dict[str, str] = {}
    if run_dir is None:
        return out
    for name, ds in cfg.data.datasets.items():
        src = ds.source
        for f in fields:
            column = ds.fields.get(f)
            if src is None or f in out or not isinstance(column, str) or column not in src.text:
                continue
            file = _vocab_file(run_dir, name, column)
            if src.text[column].tokenizer is None and file.is_file():
                out[f] = str(file)
    return out


def run_tokenizers(
    name: str, ds: DatasetConfig, columns: Sequence[str], run_dir: Path | None
) -> dict[str, Tokenizer]:
    """The tokenizer of each text column among ``columns``: the declared user callable, or the
    run's saved vocabulary (never rebuilt: predictions use the training ids).

    Raises:
        DataError: A vocabulary file the run directory lacks, naming the file.
    """
    from mtlgraph.data.sources.tokenizer import WordTokenizer
    from mtlgraph.experiment.sources import _user_tokenizer, _vocab_file

    assert ds.source is not None
    out: dict[str, Tokenizer] = {}
    problems = []
    for column, tc in ds.source.text.items():
        if column not in columns:
            continue
        where = f"data.datasets.{name}.source.text.{column}"
        if tc.tokenizer is not None:
            out[column] = _user_tokenizer(tc.tokenizer, where)
            continue
        file = _vocab_file(run_dir or Path("<run_dir>"), name, column)
        if run_dir is None or not file.is_file():
            problems.append(
                f"{where}: text column '{column}' needs the run's vocabulary '{file}', which "
                "does not exist; pass the run directory the model was trained in as --checkpoint"
            )
            continue
        out[column] = WordTokenizer.load(file)
    if problems:
        raise DataError(problems)
    return out


def _columns(ds: DatasetConfig, fields: Sequence[str]) -> list[str]:
    specs = [ds.fields[f] for f in fields]
    return list(dict.fromkeys(c for s in specs for c in ([s] if isinstance(s, str) else s)))


def _read_fields(
    table: Table, mapping: Mapping[str, str | list[str]], origin: str, toks: Mapping[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems: list[str] = []
    for f, spec in mapping.items():
        try:
            out[f] = field_values(table, spec, origin, toks)
        except DataError as e:
            problems += [f"input field '{f}': {p}" for p in e.problems]
    if problems:
        raise DataError(problems, header=f"cannot read {origin}:" if len(problems) > 1 else None)
    return out


def _ids(table: Table, id_column: str | None, start: int, n: int, origin: str) -> list[Any]:
    if id_column is None:
        return list(range(start, start + n))
    if id_column not in table:
        raise DataError([f"{origin} has no id column '{id_column}'; it has {quoted(table)}"])
    return [v.item() if isinstance(v, np.generic) else v for v in table[id_column]]


def read_source_data(
    cfg: ExperimentConfig,
    name: str,
    path: str | Path,
    fields: Sequence[str],
    id_column: str | None,
    run_dir: Path | None,
) -> PredictionData:
    """New data for ``fields`` read with dataset ``name``'s declared source (no labels)."""
    ds = cfg.data.datasets[name]
    assert ds.source is not None
    if ds.source.type == "images":
        return _read_images(cfg, name, Path(path), fields, id_column, run_dir)
    return _read_tables(name, ds, path, fields, id_column, run_dir)


def _format(file: Path, declared: str | None) -> str | None:
    """The declared format, unless the new file's suffix names one (it may differ)."""
    from mtlgraph.data.sources.table import _SUFFIXES

    return None if file.suffix.lstrip(".").lower() in _SUFFIXES else declared


def _table_files(path: str | Path) -> list[Path]:
    from mtlgraph.data.sources.shards import shard_files

    if glob.has_magic(str(path)):
        return [Path(f) for f in shard_files(str(path), Path.cwd())]
    p = Path(path)
    if p.is_dir():
        raise DataError([f"--data {path}: a directory; give a table file or a glob of them"])
    return [p]


def _read_tables(
    name: str,
    ds: DatasetConfig,
    path: str | Path,
    fields: Sequence[str],
    id_column: str | None,
    run_dir: Path | None,
) -> PredictionData:
    from mtlgraph.experiment.predict import PredictionData

    assert ds.source is not None
    declared = ds.source.format
    files = _table_files(path)
    mapping = {f: ds.fields[f] for f in fields}
    toks = run_tokenizers(name, ds, _columns(ds, fields), run_dir)
    # the first file is checked now: a missing column is named before anything is written
    _read_fields(read_table(files[0], _format(files[0], declared)), mapping, f"'{files[0]}'", toks)

    def chunks(size: int) -> Iterator[Any]:
        start = 0
        for file in files:
            table = read_table(file, _format(file, declared))
            n = len(next(iter(table.values()))) if table else 0
            X = _read_fields(table, mapping, f"'{file}'", toks)
            ids = _ids(table, id_column, start, n, f"'{file}'")
            for i in range(0, n, size):
                yield ids[i : i + size], {f: v[i : i + size] for f, v in X.items()}
            start += n

    source = f"'{path}'" if len(files) == 1 else f"{len(files)} files matching '{path}'"
    return PredictionData(source, None, chunks)


def _read_images(
    cfg: ExperimentConfig,
    name: str,
    path: Path,
    fields: Sequence[str],
    id_column: str | None,
    run_dir: Path | None,
) -> PredictionData:
    from mtlgraph.data.sources.images import require_pillow
    from mtlgraph.experiment.predict import PredictionData
    from mtlgraph.experiment.sources import image_decoder

    ds = cfg.data.datasets[name]
    assert ds.source is not None and ds.source.images is not None
    ic = ds.source.images
    require_pillow("predicting on images")
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError([f"--data {path}: no image files ({', '.join(IMAGE_SUFFIXES)})"])
        table: Table = {ic.column: np.asarray(files, dtype=object)}
        folder = path
    else:
        table, folder = read_table(path, _format(path, ds.source.format)), path.parent
    origin = f"'{path}'"
    image_fields = [f for f in fields if ds.fields[f] == ic.column]
    others = {f: ds.fields[f] for f in fields if f not in image_fields}
    toks = run_tokenizers(name, ds, _columns(ds, list(others)), run_dir)
    X = _read_fields(table, others, origin, toks)
    if ic.column not in table:
        raise DataError([f"{origin} has no image column '{ic.column}'; it has {quoted(table)}"])
    files = [str(f) for f in table[ic.column]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError([f"{len(missing)} image file(s) missing from '{folder}': {missing[:5]}"])
    ids = files if id_column is None else _ids(table, id_column, 0, len(files), origin)
    decoder = image_decoder(ic)

    def chunks(size: int) -> Iterator[Any]:
        for i in range(0, len(files), size):
            yield _image_chunk(decoder, folder, files[i : i + size], image_fields, X, ids, i)

    return PredictionData(origin, len(files), chunks)


def _image_chunk(
    decoder: Callable[[Path], Any],
    folder: Path,
    files: list[str],
    image_fields: list[str],
    X: Mapping[str, Any],
    ids: list[Any],
    start: int,
) -> Callable[[], tuple[list[Any], dict[str, Any]]]:
    """A chunk decoded when called (so that a worker decodes only its own chunks)."""

    def load() -> tuple[list[Any], dict[str, Any]]:
        import torch

        stop = start + len(files)
        out: dict[str, Any] = {f: v[start:stop] for f, v in X.items()}
        if image_fields:
            images = torch.stack([decoder(folder / f) for f in files])
            out.update({f: images for f in image_fields})
        return ids[start:stop], out

    return load


def read_source_dataset(
    cfg: ExperimentConfig, ref: str, fields: Sequence[str], run_dir: Path | None
) -> PredictionData:
    """``--data NAME[:SPLIT]`` for a dataset declared with a ``source``, built for the run
    directory (its saved vocabulary), labels ignored."""
    from mtlgraph.data.datasets import collate_dicts
    from mtlgraph.experiment.predict import PredictionData
    from mtlgraph.experiment.sources import load_sources

    name, _, split = ref.partition(":")
    ds = cfg.data.datasets[name]
    run_tokenizers(name, ds, _columns(ds, [f for f in fields if f in ds.fields]), run_dir)
    one = copy.copy(cfg)
    one.data = copy.copy(cfg.data)
    one.data.datasets = {name: ds}
    found = load_sources(one, run_dir)[0]
    chosen = [d for d in found if not split or d.split == split]
    if not chosen:
        raise DataError(
            [f"dataset '{name}' has no split '{split}'; it has {quoted(d.split for d in found)}"]
        )
    unknown = [f for f in fields if f not in ds.fields]
    if unknown:
        raise DataError([f"dataset '{ref}' of the config has no input field {quoted(unknown)}"])

    def chunks(size: int) -> Iterator[Any]:
        for d in chosen:
            buf: list[tuple[Any, Any]] = []
            for item in _items(d):
                buf.append(item)
                if len(buf) == size:
                    yield _collated(buf, d.split, split, fields, collate_dicts)
                    buf = []
            if buf:
                yield _collated(buf, d.split, split, fields, collate_dicts)

    return PredictionData(f"dataset '{ref}' of the config", None, chunks)


def _items(d: Any) -> Iterator[tuple[Any, Any]]:
    """``(id, (x, y))`` of a built dataset, in order: image file names, else row numbers."""
    from mtlgraph.data.datasets import DictDataset
    from mtlgraph.data.sources.images import ImageFolder

    inner = getattr(d, "dataset", None)
    if isinstance(inner, ImageFolder):
        yield from zip(inner.files, (inner[i] for i in range(len(inner))), strict=True)
    elif isinstance(d, DictDataset):
        yield from ((i, d[i]) for i in range(len(d)))
    elif inner is not None:  # a stream: in file order (training shuffles its split)
        stream = copy.copy(inner)
        if hasattr(stream, "shuffle"):
            stream.shuffle = False
        yield from enumerate(iter(stream))
    else:
        yield from enumerate(iter(d))


def _collated(
    buf: list[tuple[Any, Any]], split: str, chosen: str, fields: Sequence[str], collate: Any
) -> tuple[list[Any], dict[str, Any]]:
    X, _ = collate([(x, {}) for _, (x, _y) in buf])
    ids = [i if chosen else f"{split}/{i}" for i, _ in buf]
    keep = {f for f in fields} | {f"{f}_mask" for f in fields}
    return ids, {f: v for f, v in X.items() if f in keep}
