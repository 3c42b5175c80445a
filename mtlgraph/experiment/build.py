"""Config objects -> modules, tasks, model, datasets, loaders and trainer.

The only place that turns a validated :class:`~mtlgraph.experiment.config.ExperimentConfig` into
the objects the Python API builds by hand; data problems are reported at once as a
:class:`~mtlgraph.DataError`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.exceptions import DataError
from mtlgraph.experiment.config import (
    DataConfig,
    DatasetConfig,
    ExperimentConfig,
    InputConfig,
    TaskConfig,
    config_to_dict,
)
from mtlgraph.experiment.module_types import build_modules as build_module_section
from mtlgraph.experiment.module_types import encoder_input_problems
from mtlgraph.experiment.sources import LabelSource, label_views, load_datasets
from mtlgraph.graph.losses import LOSSES
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.task import Input, InputSpec, Operation, Task
from mtlgraph.metrics import Scorer
from mtlgraph.training.checkpoint import metric_keys, metric_mode
from mtlgraph.training.labels import dataset_label_problems
from mtlgraph.training.trainer import Trainer, TrainerConfig


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
    """The ``modules`` section, built in order (referenced modules first) with torch seeded by
    ``cfg.seed`` (the global random state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_module_section(cfg.modules, cfg.base_dir)


def _input(spec: str | list[str | int] | InputConfig) -> InputSpec:
    if isinstance(spec, InputConfig):
        return Input(spec.source, spec.key, spec.detach)
    if isinstance(spec, list):
        return (str(spec[0]), spec[1])
    return spec


def build_task(name: str, tc: TaskConfig, modules: Mapping[str, nn.Module]) -> Task:
    """One :class:`Task` from its config; modules are shared by name through ``modules``."""
    pool_names = tc.modules or list(dict.fromkeys(op.module for op in tc.ops))
    loss = LOSSES.build(tc.loss, f"tasks.{name}.loss") if tc.loss is not None else None
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


def build_loaders(cfg: ExperimentConfig, datasets: Sequence[DictDataset]) -> list[DictDataLoader]:
    """A loader per dataset split: the dataset's batch size, shuffled if it is a training split
    and ``shuffle`` is on (seed ``data.seed + crc32(dataset name)``; its ``shuffle_block``)."""
    loaders = []
    for ds in datasets:
        dcfg = cfg.data.datasets[ds.name]
        shuffle = dcfg.shuffle if dcfg.shuffle is not None else cfg.data.shuffle
        shuffle = shuffle and ds.split == cfg.trainer.train_split
        loaders.append(
            DictDataLoader(
                ds,
                batch_size=dcfg.batch_size or cfg.data.batch_size,
                shuffle=shuffle,
                seed=cfg.data.seed + zlib.crc32(ds.name.encode()),
                shuffle_block=dcfg.shuffle_block if shuffle else 1,
                **loader_options(cfg.data, dcfg),
            )
        )
    return loaders


def check_labels(
    model: MultitaskClassifier,
    datasets: Sequence[DictDataset],
    sources: Mapping[tuple[str, str, str], LabelSource],
) -> None:
    """Check every label against its task (:mod:`mtlgraph.training.labels` says how).

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
    loaded = load_datasets(cfg, run_dir)
    datasets, sources, vocabularies = loaded.datasets, loaded.label_sources, loaded.vocabularies
    problems = encoder_input_problems(cfg, model, loaded.tokenizers)
    if problems:
        raise DataError(problems, header="the data does not fit the pretrained encoders:")
    check_labels(model, label_views(datasets), sources)
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
        metric_mode(key, None, keys, "trainer.checkpoint_metric")  # raises for a key not logged
    return Experiment(cfg, model, datasets, loaders, trainer)
