"""Datasets declared in YAML -> datasets: every ``data.datasets.<name>.source``.

Files are read through :mod:`mtlgraph.data.sources`; text columns get a vocabulary built from the
training split, written to ``<run_dir>/vocab/`` and fingerprinted in checkpoints. See
``docs/data-sources.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataset
from mtlgraph.data.named import NamedDataset
from mtlgraph.data.sources.files import Table, read_table
from mtlgraph.data.sources.table import Tokenizer, split_table, table_columns
from mtlgraph.data.sources.tokenizer import (
    TOKENIZERS,
    SubwordTokenizer,
    TextTokenizer,
    WordTokenizer,
    load_tokenizer,
)
from mtlgraph.data.synthetic import GENERATORS
from mtlgraph.exceptions import CheckpointError, DataError
from mtlgraph.experiment.data_config import DatasetConfig, ImagesConfig, SourceConfig, TextConfig

if TYPE_CHECKING:
    from mtlgraph.experiment.config import ExperimentConfig, TaskConfig

VOCAB_DIR = "vocab"
"""Run-directory folder holding the vocabularies (``<dataset>.<column>.json``)."""


@dataclass(frozen=True)
class LabelSource:
    """Where a dataset split's labels of one task came from (for messages)."""

    key: str  # dotted config key, e.g. data.datasets.reviews.labels.yelp_task
    origin: str  # e.g. "column 'label' of 'data/reviews.csv'"


class Loaded(NamedTuple):
    """What :func:`load_datasets` returns."""

    datasets: list[Any]  # one per dataset and split (DictDataset, or NamedDataset of files)
    label_sources: dict[tuple[str, str, str], LabelSource]  # (dataset, split, task) -> origin
    vocabularies: dict[str, str]  # {dataset.column: fingerprint} of the vocabularies built
    tokenizers: dict[tuple[str, str], Any]  # (dataset, text column) -> its tokenizer


# ---------------------------------------------------------------- tokenizers


def vocab_file(run_dir: Path, dataset: str, column: str) -> Path:
    """Where a run keeps the vocabulary of a dataset's text column."""
    return run_dir / VOCAB_DIR / f"{dataset}.{column}.json"


def tokenizers(
    name: str,
    src: SourceConfig,
    train: Table | None,
    run_dir: Path | None,
    saved: Mapping[str, str],
    base: Path = Path("."),
) -> dict[str, Tokenizer]:
    """The tokenizer of each text column: a user callable, a vocabulary built from the
    training split, or a model directory's own (kept in ``run_dir``; one already there must
    equal the rebuilt one)."""
    out: dict[str, Tokenizer] = {}
    for column, tc in src.text.items():
        if tc.tokenizer is not None:
            out[column] = TOKENIZERS.build(tc.tokenizer, f"source.text.{column}.tokenizer")
        else:
            out[column] = _vocabulary(name, column, tc, train, run_dir, saved, base)
    return out


def _make_tokenizer(
    tc: TextConfig, train: Table | None, column: str, base: Path, saved: Any = None
) -> TextTokenizer:
    """The tokenizer a text declaration describes: pretrained, or fitted on ``train`` (a
    subword tokenizer ``saved`` from the same texts and settings is reused)."""
    where = f"source.text.{column}"
    if tc.pretrained is not None:
        local = base / tc.pretrained
        path = local if local.exists() else Path(tc.pretrained)
        try:
            return SubwordTokenizer.pretrained(path, tc.max_length)
        except DataError as e:
            raise DataError([f"{where}.pretrained: {p}" for p in e.problems]) from None
        except ImportError as e:  # the hf extra is missing: say which setting needs it
            raise DataError([f"{where}.pretrained: {e}"]) from e
    if train is None or column not in train:
        missing = "no training split" if train is None else f"no column '{column}'"
        raise DataError([f"{where}: the vocabulary is built from the training split: {missing}"])
    texts = ["" if v is None else str(v) for v in train[column]]
    if tc.kind == "word":
        return WordTokenizer.fit(texts, tc.vocab_size, tc.min_count, tc.lowercase, tc.max_length)
    try:
        return SubwordTokenizer.fit(
            texts, tc.kind, tc.vocab_size, tc.min_count, tc.lowercase, tc.max_length, saved
        )
    except ImportError as e:  # the hf extra is missing: say which setting needs it
        raise DataError([f"{where}.kind: {e}"]) from e


def _vocabulary(
    name: str,
    column: str,
    tc: TextConfig,
    train: Table | None,
    run_dir: Path | None,
    saved: Mapping[str, str],
    base: Path = Path("."),
) -> TextTokenizer:
    where = f"source.text.{column}"
    key = f"{name}.{column}"
    file = vocab_file(run_dir, name, column) if run_dir is not None else None
    if train is None and file is not None and file.is_file():
        return load_tokenizer(file)  # no training split loaded (evaluation): the run's own
    kept = load_tokenizer(file) if file is not None and file.is_file() else None
    tok = _make_tokenizer(tc, train, column, base, kept)  # the same texts: the kept one
    if kept is not None and kept != tok:
        raise DataError(
            f"{where}: the vocabulary built from this config's training split differs "
            f"from the run's '{file}': the data or the tokenizer settings changed since "
            "the run started; resume with them unchanged, or start a new run directory"
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


# ---------------------------------------------------------------- labels


def _soft_labels(labels: torch.Tensor, task: TaskConfig) -> bool:
    """Soft labels: floats ``(N, C)`` for a multiclass task, floats ``(N,)`` that are not all
    class ids for a binary task (probabilities of the positive class)."""
    if task.task_type == "multiclass":
        return labels.ndim == 2
    if task.task_type != "binary" or labels.ndim != 1:
        return False
    finite = labels[~torch.isnan(labels)]
    return bool((finite != torch.round(finite)).any())


def task_labels(
    labels: torch.Tensor, task: TaskConfig, column: str, place: Callable[[int], str]
) -> torch.Tensor:
    """Labels as the task type needs them: floats for regression and soft labels, class ids
    otherwise; a missing label (NaN: an empty cell) becomes the task's ignore value.

    Raises:
        DataError: Missing labels without an integer ignore value, or a class id that is not
            a whole number, naming the row (``place(i)``).
    """
    if task.task_type == "regression":
        return labels.float()
    if not labels.is_floating_point():
        return labels.long()
    ignore = task.ignore_value if task.ignore_value != "default" else -1
    nan = torch.isnan(labels)
    numeric = isinstance(ignore, (int, float)) and not isinstance(ignore, bool)
    if _soft_labels(labels, task):
        return (torch.where(nan, float(ignore), labels) if numeric else labels).float()  # type: ignore[arg-type]
    if nan.any():
        if not (isinstance(ignore, int) and not isinstance(ignore, bool)):
            raise DataError(
                f"{place(int(nan.nonzero()[0][0]))}, column '{column}': a missing label, but "
                f"the task's ignore_value is {ignore}"
            )
        labels = torch.where(nan, float(ignore), labels)
    frac = (labels != torch.round(labels)).reshape(len(labels), -1).any(dim=1)
    if frac.any():
        i = int(frac.nonzero()[0])
        raise DataError([f"{place(i)}, column '{column}': {labels[i].tolist()} is not a class id"])
    return labels.long()


# ---------------------------------------------------------------- loading


def load_datasets(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Loaded:
    """Datasets (one per split) of every dataset of the config.

    Raises:
        DataError: Missing files or columns, bad cells or labels, a vocabulary that does not
            match the run directory's: every dataset's problems at once.
        CheckpointError: A vocabulary that does not match the run directory's checkpoint.
    """
    run = Path(run_dir) if run_dir is not None else None
    saved = saved_vocabularies(run)
    problems: list[str] = []
    out = Loaded([], {}, {}, {})
    for name, ds in cfg.data.datasets.items():
        try:
            found, toks = _load_one(cfg, name, ds, run, saved, out.label_sources)
        except DataError as e:
            problems += [_at(f"data.datasets.{name}", p) for p in e.problems]
            continue
        out.datasets.extend(found)
        out.tokenizers.update({(name, c): t for c, t in toks.items()})
        out.vocabularies.update(
            {
                f"{name}.{c}": t.fingerprint
                for c, t in toks.items()
                if isinstance(t, (WordTokenizer, SubwordTokenizer))
            }
        )
    problems = list(dict.fromkeys(problems))  # one file serves several splits: say it once
    if problems:
        n = len(problems)
        raise DataError(problems, header=f"cannot load the data ({n} problem{'s' * (n > 1)}):")
    return out


def _at(key: str, problem: str) -> str:
    """``key.sub: ...`` for a problem that starts with a key below ``key``, else ``key: ...``."""
    head = problem.split(":", 1)[0]
    nested = head.split(".", 1)[0] in ("source", "fields", "labels", "splits") and " " not in head
    return f"{key}.{problem}" if nested else f"{key}: {problem}"


def _load_one(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    run: Path | None,
    saved: Mapping[str, str],
    label_sources: dict[tuple[str, str, str], LabelSource],
) -> tuple[list[Any], dict[str, Tokenizer]]:
    src = ds.source
    if src.type == "shards":
        return _shards(cfg, name, ds, run, saved)
    tables = split_tables(src, Path(cfg.base_dir), ds.splits)
    train = tables.get(cfg.trainer.train_split)
    toks = tokenizers(name, src, train, run, saved, Path(cfg.base_dir))
    out, problems = [], []
    for split, table in tables.items():
        if len(next(iter(table.values()), ())) == 0:
            problems.append(f"split '{split}' of {table.origin} has no rows")
            continue
        try:
            out.append(_dataset(cfg, name, ds, split, table, toks))
        except DataError as e:
            problems += e.problems
            continue
        for task, spec in ds.labels.items():
            what = f"column '{spec}' of {table.origin}"
            label_sources[(name, split, task)] = LabelSource(
                f"data.datasets.{name}.labels.{task}", what
            )
    if problems:
        raise DataError(problems)
    return out, toks


def split_tables(src: SourceConfig, base: Path, splits: list[str] | None) -> dict[str, Table]:
    """``{split: table}`` of a generator, table, npy or image source."""
    if src.type == "generator":
        assert src.name is not None
        data = GENERATORS.get(src.name)(**src.args)
        out = {s: Table(t, f"generator '{src.name}'", typed=True) for s, t in data.items()}
    else:
        out = _file_tables(src, base)
    if splits is not None:
        unknown = [s for s in splits if s not in out]
        if unknown:
            raise DataError(
                [
                    f"splits: no split '{s}'{did_you_mean(s, out)}; it has {quoted(out)}"
                    for s in unknown
                ]
            )
        out = {s: out[s] for s in splits}
    return out


def _file_tables(src: SourceConfig, base: Path) -> dict[str, Table]:
    files = src.path if isinstance(src.path, dict) else {"": src.path}
    out: dict[str, Table] = {}
    problems: list[str] = []
    for split, rel in files.items():
        if not isinstance(rel, str):
            problems.append(f"source.path.{split}: one file per split for type '{src.type}'")
            continue
        file = base / rel  # an absolute path stays itself
        try:
            table = read_table(file, src.file_format())
        except DataError as e:
            problems += [f"source.path: {p}" for p in e.problems]
            continue
        if split:
            out[split] = table
            continue
        try:
            out.update(split_table(table, src.split_column, src.fractions))
        except DataError as e:
            problems += [f"source.split_column: {p}" for p in e.problems]
    if problems:
        raise DataError(problems)
    return out


def _dataset(
    cfg: ExperimentConfig,
    name: str,
    ds: DatasetConfig,
    split: str,
    table: Table,
    toks: Mapping[str, Tokenizer],
) -> Any:
    labels = {task: _single(spec, f"labels.{task}") for task, spec in ds.labels.items()}
    ic = ds.source.images
    if ic is not None:
        from mtlgraph.data.sources.images import ImageFolder

        image_fields = [f for f, c in ds.fields.items() if c == ic.column]
        if len(image_fields) != 1:
            raise DataError(
                f"fields: exactly one field must read the image column '{ic.column}' "
                f"(e.g. 'image: {ic.column}'), got {quoted(image_fields) or 'none'}"
            )
        folder = Path(cfg.base_dir) / ic.folder  # an absolute folder stays itself
        others = {f: c for f, c in ds.fields.items() if f != image_fields[0]}
        images = ImageFolder(
            folder,
            table,
            image_fields[0],
            ic.column,
            others,
            labels,
            image_decoder(ic, Path(cfg.base_dir)),
            toks,
        )
        dataset, Y = NamedDataset(name, split, images, labels=list(labels)), images.Y
    else:
        X, Y = table_columns(table, ds.fields, labels, toks)
        dataset = None
    problems = []
    for task, column in labels.items():
        try:
            Y[task] = task_labels(Y[task], cfg.tasks[task], column, table.place)
        except DataError as e:
            problems += [f"labels.{task}: {p}" for p in e.problems]
    if problems:
        raise DataError(problems)
    return dataset if dataset is not None else DictDataset(name, split, X, Y)


def _table_labels(
    tasks: Mapping[str, TaskConfig],
    columns: Mapping[str, str],
    task: str,
    labels: torch.Tensor,
    table: Table,
) -> torch.Tensor:
    """:func:`task_labels` of a table's labels (a shard's, in a loader's worker)."""
    return task_labels(labels, tasks[task], columns[task], table.place)


def _single(spec: str | list[str], key: str) -> str:
    if not isinstance(spec, str):
        raise DataError([f"{key}: name one label column, got {spec}"])
    return spec


def _shards(
    cfg: ExperimentConfig, name: str, ds: DatasetConfig, run: Path | None, saved: Mapping[str, str]
) -> tuple[list[Any], dict[str, Tokenizer]]:
    """One :class:`ShardStream` per split; a vocabulary reads the training shards once first."""
    from mtlgraph.data.sources.shards import ShardStream, shard_files

    src = ds.source
    train_split = cfg.trainer.train_split
    specs = src.path if isinstance(src.path, dict) else {train_split: src.path}
    if ds.splits is not None:
        specs = {s: v for s, v in specs.items() if s in ds.splits}
    problems: list[str] = []
    files: dict[str, list[Path]] = {}
    for split, spec in specs.items():
        try:
            files[split] = shard_files(spec or [], cfg.base_dir)
        except DataError as e:
            key = f"source.path{'.' + split if isinstance(src.path, dict) else ''}"
            problems += [f"{key}: {p}" for p in e.problems]
    if problems:
        raise DataError(problems)
    built = [c for c, tc in src.text.items() if tc.tokenizer is None and tc.pretrained is None]
    train: Table | None = None
    if built and train_split in files:
        parts = [read_table(f, src.format, built) for f in files[train_split]]
        train = Table({c: np.concatenate([p[c] for p in parts]) for c in built})
    toks = tokenizers(name, src, train, run, saved, Path(cfg.base_dir))
    labels = {task: _single(spec, f"labels.{task}") for task, spec in ds.labels.items()}
    labels_as = partial(_table_labels, {t: cfg.tasks[t] for t in labels}, labels)
    out = []
    for split, found in files.items():
        shuffle = split == train_split
        stream = ShardStream(
            found, ds.fields, labels, toks, src.format, shuffle=shuffle, labels_as=labels_as
        )
        out.append(NamedDataset(name, split, stream, labels=list(labels)))
    return out, toks


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


def image_decoder(ic: ImagesConfig, base: Path = Path(".")) -> Any:
    """The :class:`~mtlgraph.data.sources.ImageDecoder` an ``images:`` declaration describes
    (mode, resize, normalise; what it leaves out taken from its ``processor`` directory):
    training and ``predict`` decode alike."""
    from mtlgraph.data.sources.images import ImageDecoder

    size = (ic.resize[0], ic.resize[1]) if ic.resize else None
    mean = tuple(ic.normalize.mean) if ic.normalize else None
    std = tuple(ic.normalize.std) if ic.normalize else None
    if ic.processor is not None:
        found = processor_settings(base / ic.processor, "images.processor")
        size = size or found["size"]
        mean, std = (mean, std) if ic.normalize else (found["mean"], found["std"])
    return ImageDecoder(mode=ic.mode, size=size, mean=mean, std=std)


def processor_settings(path: Path, where: str) -> dict[str, Any]:
    """``size`` (height, width), ``mean`` and ``std`` of a model directory's image-processor
    config (``preprocessor_config.json``); ``None`` for what it does not say.

    Raises:
        DataError: No such file, or one that is not JSON.
    """
    import json

    file = path / "preprocessor_config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            [
                f"{where}: cannot read the image-processor config '{file}' ({e}); give the model "
                "directory that holds preprocessor_config.json, or declare resize and normalize"
            ]
        ) from None
    size = data.get("size") if data.get("do_resize", True) else None
    if isinstance(size, dict):
        side = size.get("shortest_edge")
        size = (size["height"], size["width"]) if "height" in size else side
    if isinstance(size, int):
        size = (size, size)
    normalize = data.get("do_normalize", True)
    mean, std = data.get("image_mean"), data.get("image_std")
    return {
        "size": tuple(int(v) for v in size) if size else None,
        "mean": tuple(float(v) for v in mean) if normalize and mean else None,
        "std": tuple(float(v) for v in std) if normalize and std else None,
    }


def label_views(datasets: list[Any]) -> list[Any]:
    """The datasets whose labels can be checked before training: the in-memory ones, and
    views of the image datasets (their labels are in memory; a stream's are not)."""
    from mtlgraph.data.sources.images import ImageFolder

    views: list[Any] = [d for d in datasets if isinstance(d, DictDataset)]
    return views + [
        _LabelView(d) for d in datasets if isinstance(getattr(d, "dataset", None), ImageFolder)
    ]


__all__ = [
    "LabelSource",
    "Loaded",
    "image_decoder",
    "label_views",
    "load_datasets",
    "split_tables",
    "task_labels",
    "tokenizers",
    "vocab_file",
]
