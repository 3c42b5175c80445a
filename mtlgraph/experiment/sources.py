"""File sources declared in YAML: ``data.datasets.<name>.source`` (images, table, shards).

The schema (:class:`SourceConfig`) is validated with the rest of the config; :func:`load_sources`
turns each declared source into datasets, one per split, the same objects the Python API builds
(``mtlgraph.data.sources``). Text columns are tokenised with a vocabulary built from the
training split; it is written to ``<run_dir>/vocab/<dataset>.<column>.json`` and its fingerprint
to the checkpoints (the experiment config's ``vocabularies``), so evaluation and a resumed run use
the same ids. See ``docs/data-sources.md``.
"""

from __future__ import annotations

import glob
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mtlgraph._suggest import quoted
from mtlgraph.data.sources.table import (
    Table,
    Tokenizer,
    read_table,
    split_table,
    table_dataset,
)
from mtlgraph.data.sources.tokenizer import WordTokenizer
from mtlgraph.exceptions import CheckpointError, DataError

if TYPE_CHECKING:
    from mtlgraph.experiment.config import DatasetConfig, ExperimentConfig, TaskConfig

VOCAB_DIR = "vocab"
"""Run-directory folder holding the vocabularies (``<dataset>.<column>.json``)."""


@dataclass
class TextConfig:
    """How a text column becomes token ids."""

    vocab_size: int = 10000  # most ids, <pad> (0) and <unk> (1) included
    min_count: int = 1  # words seen fewer times in the training split are <unk>
    lowercase: bool = True  # lowercase texts before counting and encoding
    max_length: int = 128  # most ids per text; longer texts are cut
    tokenizer: str | None = None  # dotted path of a `str -> ids` callable; null = built-in

    def validate(self) -> list[str]:
        problems = []
        if self.vocab_size < 3:
            problems.append(f"vocab_size: must be >= 3 (2 special tokens), got {self.vocab_size}")
        if self.min_count < 1:
            problems.append(f"min_count: must be >= 1, got {self.min_count}")
        if self.max_length < 1:
            problems.append(f"max_length: must be >= 1, got {self.max_length}")
        if self.tokenizer is not None and "." not in self.tokenizer:
            problems.append(f"tokenizer: write a dotted path 'module.name', got {self.tokenizer!r}")
        return problems


@dataclass
class NormalizeConfig:
    """Per-channel normalisation of pixels scaled to [0, 1]: (x - mean) / std."""

    mean: list[float]  # one value per channel
    std: list[float]  # one value per channel, > 0


@dataclass
class ImagesConfig:
    """Where the image files are and how they are decoded."""

    folder: str  # directory of the image files (relative to the config file)
    column: str = "file"  # table column naming each row's file (relative to `folder`)
    mode: Literal["L", "RGB", "RGBA"] = "RGB"  # Pillow mode: 1, 3 or 4 channels
    resize: list[int] | None = None  # [height, width] in pixels; null = keep the file's size
    normalize: NormalizeConfig | None = None  # per-channel mean/std; null = pixels in [0, 1]

    def validate(self) -> list[str]:
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            return [f"resize: [height, width] of positive integers, got {self.resize}"]
        return []


@dataclass
class SourceConfig:
    """A file source: a table, an image folder with its table, or streamed shards."""

    type: Literal["images", "table", "shards"]  # what the files are
    path: str | list[str] | dict[str, str | list[str]]  # file | glob | list | {split: ...}
    format: Literal["csv", "jsonl", "parquet"] | None = None  # null = from the file suffix
    images: ImagesConfig | None = None  # type images: the folder and the decoding
    text: dict[str, TextConfig] = field(default_factory=dict)  # text column -> tokenizer
    split_column: str | None = None  # column naming each row's split (a single file)
    fractions: dict[str, float] | None = None  # {split: fraction} cut in row order (one file)

    def validate(self) -> list[str]:
        problems = []
        if (self.type == "images") != (self.images is not None):
            problems.append("images: needed by type 'images' (and only by it)")
        single = isinstance(self.path, str) and not glob.has_magic(self.path)
        if self.type != "shards" and not single and not isinstance(self.path, dict):
            problems.append(
                "path: a table or image source reads one file, or {split: file}; "
                "use type 'shards' for lists and globs"
            )
        for key in ("split_column", "fractions"):
            if getattr(self, key) is not None and (self.type == "shards" or not single):
                problems.append(f"{key}: only for a single table file ('path: file.csv')")
        if self.split_column is not None and self.fractions is not None:
            problems.append("fractions: give 'split_column' or 'fractions', not both")
        bad = [f"{k}={v}" for k, v in (self.fractions or {}).items() if not 0 < v <= 1]
        if bad or sum((self.fractions or {}).values()) > 1 + 1e-9:
            problems.append("fractions: each in (0, 1], summing to at most 1")
        return problems


# ---------------------------------------------------------------- loading


def _user_tokenizer(path: str, where: str) -> Tokenizer:
    module, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise DataError(
            [
                f"{where}.tokenizer: cannot import '{path}' ({e}); list its module under "
                "'imports:' or fix the path"
            ]
        ) from None
    if not callable(obj):
        raise DataError([f"{where}.tokenizer: '{path}' is not callable (text -> ids)"])
    return obj


def _split_tables(
    name: str, src: SourceConfig, base: Path, splits: list[str] | None
) -> dict[str, tuple[Table, str]]:
    """``{split: (table, origin)}`` of a table or image source."""
    where = "source"  # messages are prefixed with the dataset's key
    files = src.path if isinstance(src.path, dict) else {"": src.path}
    out: dict[str, tuple[Table, str]] = {}
    problems: list[str] = []
    for split, rel in files.items():
        if not isinstance(rel, str):
            problems.append(f"{where}.path.{split}: one file per split for type '{src.type}'")
            continue
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        try:
            table = read_table(file, src.format)
        except DataError as e:
            problems += [f"{where}.path: {p}" for p in e.problems]
            continue
        if split:
            out[split] = (table, f"'{rel}'")
            continue
        try:
            parts = split_table(table, src.split_column, src.fractions, f"'{rel}'")
        except DataError as e:
            problems += [f"{where}.split_column: {p}" for p in e.problems]
            continue
        out.update({s: (t, f"'{rel}'") for s, t in parts.items()})
    if problems:
        raise DataError(problems)
    if splits is not None:
        unknown = [s for s in splits if s not in out]
        if unknown:
            raise DataError([f"splits: no split '{s}'; it has {quoted(out)}" for s in unknown])
        out = {s: v for s, v in out.items() if s in splits}
    return out


def _vocab_file(run_dir: Path, dataset: str, column: str) -> Path:
    return run_dir / VOCAB_DIR / f"{dataset}.{column}.json"


def tokenizers(
    name: str,
    src: SourceConfig,
    train: Table | None,
    run_dir: Path | None,
    saved: Mapping[str, str],
) -> dict[str, Tokenizer]:
    """The tokenizer of each text column: a user callable, or a word vocabulary built from the
    training split (kept in ``run_dir``; one already there must equal the rebuilt one)."""
    out: dict[str, Tokenizer] = {}
    for column, tc in src.text.items():
        where = f"source.text.{column}"
        if tc.tokenizer is not None:
            out[column] = _user_tokenizer(tc.tokenizer, where)
        else:
            out[column] = _vocabulary(name, column, tc, train, run_dir, saved)
    return out


def _vocabulary(
    name: str,
    column: str,
    tc: TextConfig,
    train: Table | None,
    run_dir: Path | None,
    saved: Mapping[str, str],
) -> WordTokenizer:
    where = f"source.text.{column}"
    key = f"{name}.{column}"
    file = _vocab_file(run_dir, name, column) if run_dir is not None else None
    if train is None and file is not None and file.is_file():
        return WordTokenizer.load(file)  # no training split loaded (evaluation): the run's own
    if train is None or column not in train:
        missing = "no training split" if train is None else f"no column '{column}'"
        raise DataError([f"{where}: the vocabulary is built from the training split: {missing}"])
    texts = ["" if v is None else str(v) for v in train[column]]
    tok = WordTokenizer.fit(texts, tc.vocab_size, tc.min_count, tc.lowercase, tc.max_length)
    if file is not None and file.is_file() and WordTokenizer.load(file) != tok:
        raise DataError(
            [
                f"{where}: the vocabulary built from this config's training split differs "
                f"from the run's '{file}': the data or the tokenizer settings changed since "
                "the run started; resume with them unchanged, or start a new run directory"
            ]
        )
    if key in saved and saved[key] != tok.fingerprint:
        raise CheckpointError(
            f"data.datasets.{name}.{where}: the checkpoint was trained with vocabulary "
            f"{saved[key]}, this config builds {tok.fingerprint}: the data or the tokenizer "
            "settings changed; resume with them unchanged, or start a new run directory"
        )
    if file is not None and not file.is_file():
        tok.save(file)
    return tok


def _as_labels(labels: torch.Tensor, task: TaskConfig, what: str) -> torch.Tensor:
    """Labels as the task type needs them: floats for regression, class ids otherwise (missing
    labels become the ignore value)."""
    if task.task_type == "regression":
        return labels.float()
    if labels.is_floating_point():
        ignore = task.ignore_value if task.ignore_value != "default" else -1
        nan = torch.isnan(labels)
        if nan.any() and isinstance(ignore, int) and not isinstance(ignore, bool):
            labels = torch.where(nan, torch.tensor(float(ignore)), labels)
        elif nan.any():
            raise DataError([f"{what} has missing labels, but the task's ignore_value is {ignore}"])
        frac = labels != torch.round(labels)
        if frac.any():
            row = int(frac.reshape(len(labels), -1).any(dim=1).nonzero()[0])
            raise DataError(
                [f"{what} holds {labels[row].tolist()} in data row {row + 1}, not a class id"]
            )
    return labels.long()


def saved_vocabularies(run_dir: Path | None) -> dict[str, str]:
    """The vocabulary fingerprints of the last checkpoint in ``run_dir`` (none: empty)."""
    if run_dir is None or not run_dir.is_dir():
        return {}
    from mtlgraph.training.checkpoint import load_checkpoint, resolve_checkpoint

    try:
        file = resolve_checkpoint(run_dir)
    except CheckpointError:
        return {}
    experiment = (load_checkpoint(file).get("config") or {}).get("experiment") or {}
    return dict(experiment.get("vocabularies") or {})


def load_sources(
    cfg: ExperimentConfig, run_dir: str | Path | None = None
) -> tuple[list[Any], dict[str, str]]:
    """Datasets (one per split) of every dataset declared with a ``source``.

    Returns:
        The datasets and the fingerprints of the vocabularies built (``{dataset.column: hash}``).

    Raises:
        DataError: Missing files or columns, bad cells, a vocabulary that does not match the run
            directory's: every dataset's problems at once.
        CheckpointError: A vocabulary that does not match the run directory's checkpoint.
    """
    run = Path(run_dir) if run_dir is not None else None
    saved = saved_vocabularies(run)
    problems: list[str] = []
    datasets: list[Any] = []
    fingerprints: dict[str, str] = {}
    for name, ds in cfg.data.datasets.items():
        src = ds.source
        if src is None:
            continue
        try:
            found, toks = _load_one(cfg, name, ds, src, run, saved)
        except DataError as e:
            problems += [f"data.datasets.{name}: {p}" for p in e.problems]
            continue
        datasets += found
        fingerprints.update(
            {f"{name}.{c}": t.fingerprint for c, t in toks.items() if isinstance(t, WordTokenizer)}
        )
    if problems:
        n = len(problems)
        raise DataError(problems, header=f"cannot load the data ({n} problem{'s' * (n > 1)}):")
    return datasets, fingerprints


def _load_one(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    src: SourceConfig,
    run: Path | None,
    saved: Mapping[str, str],
) -> tuple[list[Any], dict[str, Tokenizer]]:
    base = Path(cfg.base_dir)
    if src.type == "shards":
        return _shards(cfg, name, ds, src, run, saved)
    tables = _split_tables(name, src, base, ds.splits)
    train = tables.get(cfg.trainer.train_split, (None, ""))[0]
    toks = tokenizers(name, src, train, run, saved)
    out = []
    for split, (table, origin) in tables.items():
        out.append(_dataset(cfg, name, ds, src, split, table, origin, toks))
    return out, toks


def _dataset(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    src: SourceConfig,
    split: str,
    table: Table,
    origin: str,
    toks: Mapping[str, Tokenizer],
) -> Any:
    labels = {task: _single(spec, f"labels.{task}") for task, spec in ds.labels.items()}
    if src.type == "table":
        dataset = table_dataset(name, split, table, ds.fields, labels, toks, origin)
        Y = dataset.Y_dict
    else:
        dataset, Y = _images(cfg, name, ds, src, split, table, origin, toks, labels)
    for task, spec in labels.items():
        Y[task] = _as_labels(Y[task], cfg.tasks[task], f"column '{spec}' of {origin}")
    return dataset


def _single(spec: str | list[str], key: str) -> str:
    if not isinstance(spec, str):
        raise DataError([f"{key}: name one label column, got {spec}"])
    return spec


def _images(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    src: SourceConfig,
    split: str,
    table: Table,
    origin: str,
    toks: Mapping[str, Tokenizer],
    labels: Mapping[str, str],
) -> tuple[Any, dict[str, torch.Tensor]]:
    from mtlgraph.data.sources.images import ImageFolder

    assert src.images is not None
    ic = src.images
    image_fields = [f for f, c in ds.fields.items() if c == ic.column]
    if len(image_fields) != 1:
        raise DataError(
            [
                f"fields: exactly one field must read the image column '{ic.column}' "
                f"(e.g. 'image: {ic.column}'), got {quoted(image_fields) or 'none'}"
            ]
        )
    decoder = image_decoder(ic)
    folder = Path(ic.folder) if Path(ic.folder).is_absolute() else Path(cfg.base_dir) / ic.folder
    others = {f: c for f, c in ds.fields.items() if f != image_fields[0]}
    images = ImageFolder(
        folder, table, image_fields[0], ic.column, others, labels, decoder, toks, origin
    )
    return named_dataset(name, split, images, list(labels)), images.Y


def _shards(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    src: SourceConfig,
    run: Path | None,
    saved: Mapping[str, str],
) -> tuple[list[Any], dict[str, Tokenizer]]:
    """One :class:`ShardStream` per split; a vocabulary reads the training shards once first."""
    from mtlgraph.data.sources.shards import ShardStream, shard_files

    train_split = cfg.trainer.train_split
    specs = src.path if isinstance(src.path, dict) else {train_split: src.path}
    if ds.splits is not None:
        specs = {s: v for s, v in specs.items() if s in ds.splits}
    problems: list[str] = []
    files: dict[str, list[Path]] = {}
    for split, spec in specs.items():
        try:
            files[split] = shard_files(spec, cfg.base_dir)
        except DataError as e:
            problems += [
                f"source.path{'.' + split if isinstance(src.path, dict) else ''}: {p}"
                for p in e.problems
            ]
    if problems:
        raise DataError(problems)
    built = [c for c, tc in src.text.items() if tc.tokenizer is None]
    train: Table | None = None
    if built and train_split in files:
        parts = [read_table(f, src.format, built) for f in files[train_split]]
        train = {c: np.concatenate([p[c] for p in parts]) for c in built}
    toks = tokenizers(name, src, train, run, saved)
    labels = {task: _single(spec, f"labels.{task}") for task, spec in ds.labels.items()}
    dtypes, ignore = {}, {}
    for task in labels:
        tc = cfg.tasks[task]
        dtypes[task] = torch.float32 if tc.task_type == "regression" else torch.int64
        value = -1 if tc.ignore_value == "default" else tc.ignore_value
        if isinstance(value, int) and not isinstance(value, bool):
            ignore[task] = value
    out = []
    for split, found in files.items():
        stream = ShardStream(
            found,
            ds.fields,
            labels,
            toks,
            src.format,
            shuffle=split == train_split,
            label_dtypes=dtypes,
            ignore_value=ignore,
        )
        out.append(named_dataset(name, split, stream, list(labels)))
    return out, toks


def named_dataset(name: str, split: str, dataset: Any, labels: list[str]) -> Any:
    """``NamedDataset(name, split, dataset)`` (the data layer's wrapper of any torch dataset)."""
    from mtlgraph.data.named import NamedDataset

    return NamedDataset(name, split, dataset, labels=labels)


class _LabelView:
    """An image dataset's in-memory labels, seen as check_labels sees a DictDataset."""

    def __init__(self, named: Any) -> None:
        self.name, self.split, self.named = named.name, named.split, named
        self.Y_dict: dict[str, torch.Tensor] = named.dataset.Y

    def __len__(self) -> int:
        return len(self.named)

    def batch(self, index: slice) -> Any:
        from mtlgraph.data.datasets import collate_dicts

        rows = range(len(self.named))[index]
        return collate_dicts([self.named[i] for i in rows])


def image_decoder(ic: ImagesConfig) -> Any:
    """The :class:`~mtlgraph.data.sources.ImageDecoder` an ``images:`` declaration describes
    (mode, resize, normalise): training and ``predict`` decode alike."""
    from mtlgraph.data.sources.images import ImageDecoder

    norm = ic.normalize
    return ImageDecoder(
        mode=ic.mode,
        size=(ic.resize[0], ic.resize[1]) if ic.resize else None,
        mean=tuple(norm.mean) if norm else None,
        std=tuple(norm.std) if norm else None,
    )


def label_views(datasets: list[Any]) -> list[Any]:
    """Views of the image datasets among ``datasets`` whose labels can be checked before
    training (their labels are in memory; a stream's are not)."""
    from mtlgraph.data.sources.images import ImageFolder

    return [_LabelView(d) for d in datasets if isinstance(getattr(d, "dataset", None), ImageFolder)]


__all__ = [
    "ImagesConfig",
    "NormalizeConfig",
    "SourceConfig",
    "TextConfig",
    "image_decoder",
    "label_views",
    "load_sources",
    "named_dataset",
    "tokenizers",
]
