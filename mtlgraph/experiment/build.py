"""Config objects -> modules, tasks, model, datasets, loaders and trainer.

The only place that reads the registries (modules, losses, metrics, generators) to turn a
validated :class:`~mtlgraph.experiment.config.ExperimentConfig` into objects. Everything here
builds the
same objects the Python API builds by hand: ``Task(...)``, ``MultitaskClassifier(...)``,
``DictDataset(...)``, ``DictDataLoader(...)`` and ``Trainer(**config)``.

Data problems (a missing file, an absent array or column, a label out of range) are reported all
at once as a :class:`~mtlgraph.DataError`, each naming the config key, the file and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.data.memmap import is_memmap
from mtlgraph.data.synthetic import GENERATORS
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.experiment.config import (
    DataConfig,
    DatasetConfig,
    ExperimentConfig,
    InputConfig,
    TaskConfig,
    config_to_dict,
)
from mtlgraph.experiment.module_types import build_module
from mtlgraph.experiment.sources import label_views, load_sources
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.task import Input, InputSpec, Operation, Task, get_loss
from mtlgraph.metrics import Scorer
from mtlgraph.training.checkpoint import metric_keys
from mtlgraph.training.labels import dataset_label_problems
from mtlgraph.training.trainer import Trainer, TrainerConfig

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}
"""How a single file is cut into splits when neither ``fractions`` nor ``split_field`` is set."""

Table = dict[str, np.ndarray]


@dataclass
class Experiment:
    """Everything a config builds.

    Attributes:
        config: The validated config.
        model: The model (modules initialised with ``config.seed``).
        datasets: One :class:`DictDataset` per dataset and split.
        loaders: One :class:`DictDataLoader` per dataset.
        trainer: The :class:`Trainer` (``Trainer(**config.trainer)``).

    Example:
        >>> from mtlgraph.experiment.build import build_experiment
        >>> from mtlgraph.experiment.config import load_config
        >>> exp = build_experiment(load_config("configs/quickstart.yaml", ["trainer.n_epochs=1"]))
        >>> exp.trainer.fit(exp.model, exp.loaders)
        >>> sorted(exp.model.module_pool)
        ['base_mlp', 'circle_head', 'inv_circle_head', 'square_head']
    """

    config: ExperimentConfig
    model: MultitaskClassifier
    datasets: list[DictDataset]
    loaders: list[DictDataLoader]
    trainer: Trainer


# ---------------------------------------------------------------- model


def build_modules(cfg: ExperimentConfig) -> dict[str, nn.Module]:
    """Instantiate the ``modules`` section in order, with torch seeded by ``cfg.seed``.

    The global torch random state is restored afterwards.
    """
    out: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for name, spec in cfg.modules.items():
            out[name] = build_module(spec, f"modules.{name}", cfg.base_dir)
    return out


def _input(spec: str | list[str | int] | InputConfig) -> InputSpec:
    if isinstance(spec, InputConfig):
        return Input(spec.source, spec.key, spec.detach)
    if isinstance(spec, list):
        return (str(spec[0]), spec[1])
    return spec


def build_task(name: str, tc: TaskConfig, modules: Mapping[str, nn.Module]) -> Task:
    """One :class:`Task` from its config; modules are shared by name through ``modules``."""
    pool_names = tc.modules or list(dict.fromkeys(op.module for op in tc.ops))
    loss = get_loss(tc.loss) if tc.loss is not None else None
    return Task(
        name=name,
        module_pool={m: modules[m] for m in pool_names},
        op_sequence=[
            Operation(op.module, [_input(s) for s in op.inputs], name=op.name) for op in tc.ops
        ],
        loss_func=loss,
        scorer=Scorer(metrics=tc.metrics) if tc.metrics is not None else None,
        task_type=tc.task_type,
        weight=tc.weight,
        ignore_value=tc.ignore_value,
        threshold=tc.threshold,
    )


def build_model(cfg: ExperimentConfig) -> MultitaskClassifier:
    """The model of a config: its modules, its tasks, merged by name."""
    modules = build_modules(cfg)
    tasks = [build_task(name, tc, modules) for name, tc in cfg.tasks.items()]
    return MultitaskClassifier(tasks, name=cfg.experiment, device=cfg.device)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class LabelSource:
    """Where a dataset split's labels of one task came from (for messages)."""

    key: str  # dotted config key, e.g. data.datasets.reviews.labels.yelp_task
    origin: str  # e.g. "column 'label' of 'data/reviews.csv'"


def _read_csv(file: Path) -> Table:
    with file.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError(["the file is empty; the first row must name the columns"])
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    out: Table = {}
    for j, name in enumerate(header):
        out[name] = np.asarray([r[j].strip() if j < len(r) else "" for r in body], dtype=str)
    return out


def _read_table(file: Path, fmt: str) -> Table:
    if fmt == "npy":
        return read_npy_dir(file)
    if fmt == "csv":
        return _read_csv(file)
    with np.load(file, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _numeric(values: np.ndarray, what: str) -> np.ndarray:
    """Strings of a csv column as float64 (empty cells are NaN), numbers unchanged."""
    if values.dtype.kind not in "US":
        return values
    out = np.empty(len(values), dtype=np.float64)
    for i, cell in enumerate(values):
        try:
            out[i] = float(cell) if cell != "" else math.nan
        except ValueError:
            raise DataError(
                [f"{what} holds {str(cell)!r} in data row {i + 1}, not a number"]
            ) from None
    return out


def _column(
    table: Table, names: str | list[str], origin: str, is_csv: bool, matrix: bool
) -> np.ndarray:
    """The array(s) or column(s) ``names`` of a table; several are stacked as columns.

    One csv column becomes ``(N, 1)`` when ``matrix`` (an input field), ``(N,)`` otherwise.
    """
    kind = "column" if is_csv else "array"
    listed = [names] if isinstance(names, str) else names
    for n in listed:
        if n not in table:
            raise DataError(
                [f"{origin} has no {kind} '{n}'{did_you_mean(n, table)}; it has {quoted(table)}"]
            )
    arrays = [
        _numeric(table[n], f"{kind} '{n}' of {origin}") if is_csv else table[n] for n in listed
    ]
    if isinstance(names, str):
        return arrays[0][:, None] if is_csv and matrix else arrays[0]
    return np.stack(arrays, axis=1)


def _splits_of(
    name: str, ds: DatasetConfig, base_dir: Path, problems: list[str]
) -> dict[str, tuple[Table, str, bool]]:
    """``{split: (table, origin, is_csv)}`` of one dataset; problems are appended."""
    key = f"data.datasets.{name}"
    if ds.generator is not None:
        data = GENERATORS.get(ds.generator)(**ds.args)
        return {s: (t, f"generator '{ds.generator}'", False) for s, t in data.items()}
    assert ds.path is not None
    files = ds.path if isinstance(ds.path, dict) else {"": ds.path}
    out: dict[str, tuple[Table, str, bool]] = {}
    for split, rel in files.items():
        file = (base_dir / rel) if not Path(rel).is_absolute() else Path(rel)
        path_key = f"{key}.path" + (f".{split}" if split else "")
        fmt = ds.format or file.suffix.lstrip(".").lower()
        if not (file.is_dir() if fmt == "npy" else file.is_file()):
            what = "directory" if fmt == "npy" else "file"
            problems.append(f"{path_key}: {what} '{rel}' does not exist (looked for {file})")
            continue
        try:
            table = _read_table(file, fmt)
        except Exception as e:  # numpy's or csv's refusal, or ours: a problem of this file
            detail = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            problems.append(f"{path_key}: cannot read '{rel}' as {fmt}: {detail}")
            continue
        origin = f"'{rel}'"
        if split:
            out[split] = (table, origin, fmt == "csv")
            continue
        for s, part in _cut(key, ds, table, origin, problems).items():
            out[s] = (part, origin, fmt == "csv")
    if ds.splits is not None:
        for i, s in enumerate(ds.splits):
            if s not in out and out:
                problems.append(
                    f"{key}.splits[{i}]: the data has no split '{s}'{did_you_mean(s, out)}; "
                    f"it has {quoted(out)}"
                )
        out = {s: v for s, v in out.items() if s in ds.splits}
    return out


def _cut(
    key: str, ds: DatasetConfig, table: Table, origin: str, problems: list[str]
) -> dict[str, Table]:
    """One file's rows cut into splits: by ``split_field``, else by ``fractions`` in row order."""
    if ds.split_field is not None:
        if ds.split_field not in table:
            problems.append(
                f"{key}.split_field: {origin} has no column or array '{ds.split_field}'"
                f"{did_you_mean(ds.split_field, table)}; it has {quoted(table)}"
            )
            return {}
        labels = table[ds.split_field].astype(str)
        return {
            s: {k: v[labels == s] for k, v in table.items()} for s in dict.fromkeys(labels.tolist())
        }
    n = len(next(iter(table.values()))) if table else 0
    out: dict[str, Table] = {}
    start = 0
    for s, fraction in (ds.fractions or DEFAULT_FRACTIONS).items():
        stop = min(n, start + round(fraction * n))
        out[s] = {k: v[start:stop] for k, v in table.items()}
        start = stop
    return out


def _label_array(values: np.ndarray, task: TaskConfig, what: str) -> np.ndarray:
    if task.task_type == "regression":
        return values.astype(np.float32)
    if _soft_yaml_labels(values, task):  # issue 15: float (N, C) labels are soft labels
        ignore = task.ignore_value if task.ignore_value != "default" else -1
        if isinstance(ignore, (int, float)) and not isinstance(ignore, bool):
            values = np.where(np.isnan(values), float(ignore), values)  # NaN: a missing label
        return values.astype(np.float32)
    if values.dtype.kind == "f":
        ignore = task.ignore_value if task.ignore_value != "default" else -1
        nan = np.isnan(values)
        if nan.any() and isinstance(ignore, int) and not isinstance(ignore, bool):
            values = np.where(nan, float(ignore), values)
        elif nan.any():
            raise DataError([f"{what} has missing labels, but the task's ignore_value is {ignore}"])
        bad = values != np.round(values)
        if bad.any():
            i = int(np.argmax(bad.reshape(len(values), -1).any(axis=1)))
            row = values.reshape(len(values), -1)[i]
            raise DataError([f"{what} holds {row} in row {i + 1}, not a class id"])
    return values.astype(np.int64)


def _soft_yaml_labels(values: np.ndarray, task: TaskConfig) -> bool:
    """Soft labels in a data file: floats ``(N, C)`` for a multiclass task, floats ``(N,)`` that
    are not all class ids for a binary task (probabilities of the positive class)."""
    if values.dtype.kind != "f":
        return False
    if task.task_type == "multiclass":
        return values.ndim == 2
    if task.task_type != "binary" or values.ndim != 1:
        return False
    finite = values[~np.isnan(values)]
    return bool((finite != finite.round()).any())


# ---------------------------------------------------------------- memory-mapped .npy, loading


def read_npy_dir(directory: Path) -> Table:
    """Every ``.npy`` file of ``directory``, memory-mapped, by file stem.

    Raises:
        DataError: The directory holds no ``.npy`` file.
    """
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise DataError([f"'{directory}' holds no .npy file; save one array per field/label"])
    return {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}


def field_data(arr: np.ndarray, key: str, problems: list[str]) -> Any:
    """An input field: floats as float32 tensors; a memory-mapped array kept mapped (a batch
    reads only its rows; float fields must then be stored as float32)."""
    if is_memmap(arr):
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            problems.append(
                f"{key}: the memory-mapped array is {arr.dtype}; mapped fields are read as "
                "stored, so save it as float32: np.save(path, array.astype(np.float32))"
            )
        return arr
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def loader_options(data: DataConfig, dataset: DatasetConfig) -> dict[str, Any]:
    """The DataLoader options of a dataset: workers (the dataset's ``num_workers`` or
    ``data.num_workers``), persistent workers, pinned memory, prefetching."""
    workers = dataset.num_workers if dataset.num_workers is not None else data.num_workers
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": data.pin_memory}
    if workers > 0:
        options["persistent_workers"] = data.persistent_workers
        if data.prefetch_factor is not None:
            options["prefetch_factor"] = data.prefetch_factor
    return options


def load_datasets(
    cfg: ExperimentConfig,
) -> tuple[list[DictDataset], dict[tuple[str, str, str], LabelSource]]:
    """Load every dataset split of the ``data`` section.

    Returns:
        The datasets (dataset order, then split order) and, per ``(dataset, split, task)``, where
        the labels came from.

    Raises:
        DataError: Missing files, absent arrays or columns, non-numeric cells, bad labels: all
            problems at once, each naming the config key, the file and the field.
    """
    problems: list[str] = []
    datasets: list[DictDataset] = []
    sources: dict[tuple[str, str, str], LabelSource] = {}
    base_dir = Path(cfg.base_dir)
    plain = {n: d for n, d in cfg.data.datasets.items() if d.source is None}  # sources: below
    for name, ds in plain.items():
        key = f"data.datasets.{name}"
        for split, (table, origin, is_csv) in _splits_of(name, ds, base_dir, problems).items():
            X: dict[str, Any] = {}
            Y: dict[str, Any] = {}
            for fld, spec in ds.fields.items():
                try:
                    arr = _column(table, spec, origin, is_csv, matrix=True)
                except ValueError as e:  # our DataError, or numpy refusing a conversion
                    problems.append(f"{key}.fields.{fld}: {e.args[0]}")
                    continue
                X[fld] = field_data(arr, f"{key}.fields.{fld}", problems)
            for task_name, spec in ds.labels.items():
                what = f"column '{spec}' of {origin}" if is_csv else f"array '{spec}' of {origin}"
                try:
                    arr = _column(table, spec, origin, is_csv, matrix=False)
                    arr = _label_array(arr, cfg.tasks[task_name], what)
                except ValueError as e:  # our DataError, or numpy refusing a conversion
                    problems.append(f"{key}.labels.{task_name}: {e.args[0]}")
                    continue
                Y[task_name] = torch.from_numpy(np.ascontiguousarray(arr))
                sources[(name, split, task_name)] = LabelSource(f"{key}.labels.{task_name}", what)
            if len(X) == len(ds.fields) and len(Y) == len(ds.labels):
                n = len(next(iter(X.values())))
                if n == 0:
                    problems.append(f"{key}: split '{split}' of {origin} has no rows")
                    continue
                try:
                    datasets.append(DictDataset(name, split, X, Y))
                except DataError as e:
                    problems += [f"{key}: {p}" for p in e.problems]
    problems = list(dict.fromkeys(problems))  # one file serves several splits: say it once
    if problems:
        raise DataError(
            problems,
            header=f"cannot load the data ({len(problems)} problem{'s' * (len(problems) > 1)}):",
        )
    return datasets, sources


def build_loaders(cfg: ExperimentConfig, datasets: Sequence[DictDataset]) -> list[DictDataLoader]:
    """A loader per dataset split: the dataset's batch size, shuffled if it is a training split
    and ``shuffle`` is on (seed ``data.seed + crc32(dataset name)``)."""
    loaders = []
    for ds in datasets:
        dcfg = cfg.data.datasets[ds.name]
        shuffle = dcfg.shuffle if dcfg.shuffle is not None else cfg.data.shuffle
        loaders.append(
            DictDataLoader(
                ds,
                batch_size=dcfg.batch_size or cfg.data.batch_size,
                shuffle=shuffle and ds.split == cfg.trainer.train_split,
                seed=cfg.data.seed + zlib.crc32(ds.name.encode()),
                **loader_options(cfg.data, dcfg),
            )
        )
    return loaders


def check_labels(
    model: MultitaskClassifier,
    datasets: Sequence[DictDataset],
    sources: Mapping[tuple[str, str, str], LabelSource],
) -> None:
    """Check every label against its task (:mod:`mtlgraph.training.labels`): class ids within
    the head's output, 0 or 1 for binary and multilabel tasks, no negative label other than the
    ignore value, finite numbers for regression.

    The number of classes comes from one forward pass of the task on a dataset's first two rows
    (evaluation mode, no gradients, torch's random state untouched).

    Raises:
        DataError: Every bad label, naming the config key, the file and the field.
    """

    def where(ds: DictDataset, task_name: str) -> str:
        source = sources.get((ds.name, ds.split, task_name))
        place = f"{source.key}: {source.origin}" if source else f"dataset '{ds.name}'"
        return f"{place} ({ds.split} split) for task '{task_name}'"

    problems: list[str] = []
    for ds in datasets:
        problems += dataset_label_problems(model, ds, where)
    if problems:
        raise DataError(problems, header=f"labels out of range ({len(problems)}):")


# ---------------------------------------------------------------- trainer and all


def build_trainer(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Trainer:
    """``Trainer(**cfg.trainer)`` (with ``run_dir`` when given); the resolved config is kept
    for checkpoints and TensorBoard's hparams."""
    kwargs = {f.name: getattr(cfg.trainer, f.name) for f in dataclasses.fields(TrainerConfig)}
    if run_dir is not None:
        kwargs["run_dir"] = str(run_dir)
    trainer = Trainer(**kwargs)
    trainer.experiment_config = config_to_dict(cfg)
    if run_dir is not None:
        trainer.experiment_config["trainer"]["run_dir"] = str(run_dir)
    return trainer


def build_experiment(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Experiment:
    """Build the model, load and check the data, make the loaders and the trainer.

    Raises:
        DataError: Data files, fields or labels that do not fit the config.
        ConfigError: A ``trainer.checkpoint_metric`` this run would never log.
    """
    model = build_model(cfg)
    datasets, sources = load_datasets(cfg)
    from_files, vocabularies = load_sources(cfg, run_dir)
    datasets += from_files
    in_memory = [d for d in datasets if isinstance(d, DictDataset)] + label_views(from_files)
    check_labels(model, in_memory, sources)
    loaders = build_loaders(cfg, datasets)
    trainer = build_trainer(cfg, run_dir)
    if vocabularies:  # kept in checkpoints: a resumed run must tokenise the same way
        kept = trainer.experiment_config or {}
        trainer.experiment_config = {**kept, "vocabularies": vocabularies}
    key = cfg.trainer.checkpoint_metric
    if key is not None:
        tc = trainer.config
        train = [dl for dl in loaders if dl.dataset.split == tc.train_split]
        evals = [dl for dl in loaders if dl.dataset.split in tc.eval_splits]
        keys = metric_keys(model, train, evals, tc.slices)
        if key not in keys:
            raise ConfigError(
                [
                    f"trainer.checkpoint_metric: '{key}' is not a key this training logs"
                    f"{did_you_mean(key, keys)}; it logs {quoted(keys)}"
                ]
            )
    return Experiment(cfg, model, datasets, loaders, trainer)
