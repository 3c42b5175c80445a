"""Snorkel 0.10's ``snorkel.classification`` API on top of mtlgraph: change one import line.

A setting mtlgraph cannot honour raises and says how Snorkel differed
(``docs/migrating-from-snorkel.md``).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.datasets import DictDataLoader as _DictDataLoader
from mtlgraph.data.datasets import DictDataset as _DictDataset
from mtlgraph.exceptions import ConfigError, GraphError
from mtlgraph.graph.losses import cross_entropy_with_probs
from mtlgraph.graph.model import MultitaskClassifier as _MultitaskClassifier
from mtlgraph.graph.task import Operation, Task
from mtlgraph.metrics import MetricFunc, MetricSpec
from mtlgraph.metrics import Scorer as _Scorer
from mtlgraph.training.checkpoint import BEST, CHECKPOINT_DIR
from mtlgraph.training.trainer import Trainer as _Trainer

__all__ = [
    "DictDataLoader",
    "DictDataset",
    "MultitaskClassifier",
    "Operation",
    "Scorer",
    "SnorkelCompatNote",
    "Task",
    "Trainer",
    "cross_entropy_with_probs",
]

logger = logging.getLogger(__name__)


class SnorkelCompatNote(UserWarning):
    """A Snorkel argument that mtlgraph accepts but ignores (shown once per call site)."""


class DictDataset(_DictDataset):
    """Snorkel's ``DictDataset(name, split, X_dict, Y_dict)`` (mtlgraph's, with Snorkel's
    ``from_tensors`` argument names).

    Example:
        >>> import torch
        >>> from mtlgraph.compat.snorkel import DictDataset
        >>> ds = DictDataset.from_tensors(torch.zeros(3, 2), torch.tensor([0, 1, 0]), "train")
        >>> ds.name, list(ds.X_dict), list(ds.Y_dict)
        ('SnorkelDataset', ['input_data'], ['task'])
    """

    @classmethod
    def from_tensors(  # type: ignore[override]  # Snorkel's argument names and order
        cls,
        X_tensor: Any,
        Y_tensor: Any,
        split: str,
        input_data_key: str = "input_data",
        task_name: str = "task",
        dataset_name: str = "SnorkelDataset",
    ) -> DictDataset:
        """Snorkel's ``from_tensors``: one field ``input_data_key``, one task ``task_name``."""
        return cls(dataset_name, split, {input_data_key: X_tensor}, {task_name: Y_tensor})


class DictDataLoader(_DictDataLoader):
    """Snorkel's ``DictDataLoader(dataset, collate_fn=collate_dicts, **kwargs)``.

    mtlgraph slices in-memory tensors, so a custom ``collate_fn`` is refused.
    """

    def __init__(self, dataset: _DictDataset, collate_fn: Any = None, **kwargs: Any) -> None:
        if collate_fn is not None:
            raise ConfigError(
                [
                    "DictDataLoader: collate_fn is not supported; mtlgraph slices in-memory "
                    "tensors per batch (Snorkel collated per-sample dicts). Pad or transform the "
                    "fields of the DictDataset instead"
                ]
            )
        super().__init__(dataset, **kwargs)


def _device(device: int | str | torch.device) -> torch.device:
    """Snorkel's device numbers: -1 is the CPU, ``n >= 0`` CUDA device ``n`` (the CPU, with a
    logged warning, when CUDA is not available, as in Snorkel)."""
    if isinstance(device, bool) or not isinstance(device, int):
        return torch.device(device)
    if device < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning("device=%d: no CUDA device is available; using the CPU", device)
        return torch.device("cpu")
    return torch.device("cuda", device)


class MultitaskClassifier(_MultitaskClassifier):
    """Snorkel's ``MultitaskClassifier(tasks, name=None, device=0, dataparallel=True)``.

    ``device`` is a number (``-1``: CPU); ``dataparallel`` is ignored with a note; a module name
    bound to two different modules raises (Snorkel kept the first).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        name: str | None = None,
        device: int | str | torch.device = 0,
        dataparallel: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ConfigError(
                [
                    f"MultitaskClassifier takes no argument '{k}'"
                    f"{did_you_mean(k, ['name', 'device', 'dataparallel'])}"
                    for k in kwargs
                ]
            )
        if dataparallel:
            warnings.warn(
                "dataparallel=True is ignored: mtlgraph trains data-parallel with DDP under "
                "torchrun (docs/distributed.md), not nn.DataParallel",
                SnorkelCompatNote,
                stacklevel=2,
            )
        try:
            super().__init__(tasks, name=name, device=_device(device))
        except GraphError as e:
            e.add_note(
                "mtlgraph.compat.snorkel: Snorkel kept the first module of a name silently; "
                "mtlgraph refuses, so that two tasks never share or split weights by accident"
            )
            raise

    def score(  # type: ignore[override]  # Snorkel's as_dataframe
        self,
        dataloaders: _DictDataLoader | Sequence[_DictDataLoader],
        remap_labels: Mapping[str, str | None] | None = None,
        as_dataframe: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Snorkel's ``score``: a dict, or a pandas DataFrame with ``as_dataframe=True``
        (columns label, dataset, split, metric, score)."""
        scores = super().score(dataloaders, remap_labels, **kwargs)
        if not as_dataframe:
            return scores
        try:
            pd = importlib.import_module("pandas")
        except ImportError as e:
            raise ImportError(
                "score(as_dataframe=True) needs pandas: pip install pandas (without it, "
                "score() returns the same numbers as a dict)"
            ) from e
        rows = [[*key.split("/", 3), value] for key, value in scores.items()]
        return pd.DataFrame(rows, columns=["label", "dataset", "split", "metric", "score"])


class Scorer(_Scorer):
    """Snorkel's ``Scorer(metrics=None, custom_metric_funcs=None, abstain_label=-1)``.

    Golds equal to ``abstain_label`` are ignored; ``score`` derives missing ``preds`` from
    ``probs`` (argmax, ties to the lowest class).

    Example:
        >>> import numpy as np
        >>> from mtlgraph.compat.snorkel import Scorer
        >>> Scorer(metrics=["accuracy"]).score(np.array([0, 1, -1]), np.array([0, 0, 1]))
        {'accuracy': 0.5}
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] | None = None,
        custom_metric_funcs: Mapping[str, MetricFunc] | None = None,
        abstain_label: int | None = -1,
    ) -> None:
        super().__init__(list(metrics or []), custom_metric_funcs)
        self.abstain_label = abstain_label

    def score(  # Snorkel's optional preds and probs
        self,
        golds: np.ndarray,
        preds: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        ignore_value: float | int | str | None = "abstain_label",
    ) -> dict[str, float]:
        if preds is None and probs is None:
            raise ConfigError(["Scorer.score needs preds or probs"])
        if preds is None:
            p = np.asarray(probs)
            preds = p.argmax(axis=1) if p.ndim == 2 else (p > 0.5).astype(np.int64)
        if probs is None:
            probs = np.asarray(preds)
        ignore = self.abstain_label if ignore_value == "abstain_label" else ignore_value
        return super().score(golds, preds, probs, ignore)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the Trainer

_SNORKEL_DEFAULTS: dict[str, Any] = {
    "seed": None,
    "n_epochs": 1,
    "lr": 0.01,
    "l2": 0.0,
    "grad_clip": 1.0,
    "train_split": "train",
    "valid_split": "valid",
    "test_split": "test",
    "progress_bar": True,
    "log_manager_config": {},
    "checkpointing": False,
    "checkpointer_config": {},
    "logging": False,
    "log_writer": "tensorboard",
    "log_writer_config": {},
    "optimizer": "adam",
    "optimizer_config": {},
    "lr_scheduler": "constant",
    "lr_scheduler_config": {},
    "batch_scheduler": "shuffled",
}
"""Snorkel 0.10's ``TrainerConfig`` keys and defaults (nested configs default to Snorkel's)."""

_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},  # Snorkel's sgd_config default
    "adam": {"amsgrad": False, "betas": (0.9, 0.999)},
    "adamax": {"betas": (0.9, 0.999), "eps": 1e-8},
}


def _unknown(section: str, keys: Sequence[str], known: Sequence[str]) -> list[str]:
    return [
        f"{section}: unknown key '{k}'{did_you_mean(k, known)}; Snorkel 0.10 knows {quoted(known)}"
        for k in keys
        if k not in known
    ]


def _optimizer(name: str, config: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    problems += _unknown(
        "optimizer_config", list(config), [f"{n}_config" for n in _OPTIMIZER_DEFAULTS]
    )
    kwargs = dict(_OPTIMIZER_DEFAULTS.get(name, {}))
    kwargs.update(config.get(f"{name}_config", {}))
    return {"name": name, **{k: tuple(v) if k == "betas" else v for k, v in kwargs.items()}}


def _lr_schedule(
    name: str, config: Mapping[str, Any], lr: float, problems: list[str]
) -> dict[str, Any]:
    """``lr_scheduler`` and ``lr_scheduler_config`` as mtlgraph settings."""
    known = ["warmup_steps", "warmup_unit", "warmup_percentage", "min_lr"]
    problems += _unknown(
        "lr_scheduler_config", list(config), [*known, "exponential_config", "step_config"]
    )
    out: dict[str, Any] = {"lr_scheduler": name}
    if name in ("exponential", "step"):
        problems.append(
            f"lr_scheduler '{name}': Snorkel stepped it after every batch, mtlgraph's '{name}' "
            "schedule decays per epoch; use mtlgraph.Trainer(lr_scheduler={'name': "
            f"'{name}', ...}}) for the per-epoch decay, or 'linear'/'cosine'"
        )
    min_lr = config.get("min_lr", 0.0)
    if min_lr and name == "linear":
        out["lr_scheduler"] = {"name": "linear", "end_factor": min_lr / lr}
        logger.info("min_lr=%g: the linear schedule ends at min_lr (Snorkel clamped at it)", min_lr)
    elif min_lr:
        problems.append(f"lr_scheduler_config.min_lr: has no mtlgraph equivalent for '{name}'")
    steps, unit = config.get("warmup_steps", 0), config.get("warmup_unit", "batches")
    if steps and unit == "epochs":
        out["warmup_epochs"] = float(steps)
    elif steps and unit == "batches":
        out["warmup_steps"] = int(steps)
    elif steps:
        problems.append(f"lr_scheduler_config.warmup_unit: 'batches' or 'epochs', got {unit!r}")
    if config.get("warmup_percentage"):
        out["warmup_fraction"] = float(config["warmup_percentage"])
    return out


_CHECKPOINTER_KEYS = [
    f"checkpoint_{k}" for k in ("dir", "factor", "metric", "task_metrics", "runway", "clear")
]


def _run_dir(cfg: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``logging``, ``log_writer``, ``checkpointing`` and their configs as a run directory."""
    out: dict[str, Any] = {}
    log_cfg = dict(cfg["log_writer_config"])
    ckpt_cfg = dict(cfg["checkpointer_config"])
    manager = dict(cfg["log_manager_config"])
    problems += _unknown("log_writer_config", list(log_cfg), ["log_dir", "run_name"])
    problems += _unknown("log_manager_config", list(manager), ["counter_unit", "evaluation_freq"])
    problems += _unknown("checkpointer_config", list(ckpt_cfg), _CHECKPOINTER_KEYS)
    unit = manager.get("counter_unit", "epochs")
    freq = manager.get("evaluation_freq", 1.0)
    if unit not in ("epochs", "batches"):
        problems.append(
            f"log_manager_config.counter_unit: {unit!r} has no mtlgraph equivalent; use "
            "'epochs' or 'batches' (mtlgraph counts optimizer steps, not data points)"
        )
    if float(freq) != int(freq) or freq < 1:
        problems.append(f"log_manager_config.evaluation_freq: a whole number >= 1, got {freq}")
    out["evaluation_unit"] = "steps" if unit == "batches" else "epochs"
    out["evaluation_freq"] = int(freq)
    if cfg["logging"]:
        log_dir = Path(log_cfg.get("log_dir", "logs"))
        out["run_dir"] = os.fspath(
            log_dir / log_cfg["run_name"] if log_cfg.get("run_name") else log_dir
        )
        writer = cfg["log_writer"]
        if writer not in ("json", "tensorboard"):
            problems.append(f"log_writer: 'json' or 'tensorboard', got {writer!r}")
        out["writers"] = ["jsonl" if writer == "json" else "tensorboard"]
    else:
        out["writers"] = []  # Snorkel wrote no logs without logging=True
    if cfg["checkpointing"]:
        out["run_dir"] = ckpt_cfg.get("checkpoint_dir") or out.get("run_dir") or "checkpoints"
        out["checkpoint_every"] = int(freq) * int(ckpt_cfg.get("checkpoint_factor", 1))
        out["checkpoint_unit"] = out["evaluation_unit"]
        metric, _, mode = str(
            ckpt_cfg.get("checkpoint_metric", "model/all/train/loss:min")
        ).rpartition(":")
        out["checkpoint_metric"], out["checkpoint_mode"] = metric, mode
        if ckpt_cfg.get("checkpoint_task_metrics"):
            problems.append(
                "checkpointer_config.checkpoint_task_metrics: mtlgraph keeps best.pt for one "
                "metric (checkpoint_metric) and last.pt; save others from trainer.history"
            )
        if ckpt_cfg.get("checkpoint_runway"):
            problems.append(
                "checkpointer_config.checkpoint_runway: not supported; mtlgraph considers every "
                "evaluation for best.pt"
            )
    return out


def snorkel_to_mtlgraph(config: Mapping[str, Any]) -> dict[str, Any]:
    """Snorkel 0.10 Trainer settings as mtlgraph :class:`~mtlgraph.Trainer` settings.

    Raises:
        ConfigError: Unknown Snorkel keys (with suggestions) and settings mtlgraph cannot
            honour, each saying how Snorkel differed; all at once.

    Example:
        >>> from mtlgraph.compat.snorkel import snorkel_to_mtlgraph
        >>> cfg = snorkel_to_mtlgraph({"n_epochs": 3, "l2": 0.01, "valid_split": "dev"})
        >>> cfg["weight_decay"], cfg["eval_splits"], cfg["grad_clip"], cfg["seed"]
        (0.01, ['dev'], 1.0, 0)
    """
    problems = _unknown("Trainer", list(config), list(_SNORKEL_DEFAULTS))
    cfg = {**_SNORKEL_DEFAULTS, **config}
    out: dict[str, Any] = {
        "n_epochs": cfg["n_epochs"],
        "lr": cfg["lr"],
        "weight_decay": cfg["l2"],
        "grad_clip": cfg["grad_clip"] or None,
        "train_split": cfg["train_split"],
        "eval_splits": [cfg["valid_split"]],
        "progress_bar": cfg["progress_bar"],
        "seed": 0 if cfg["seed"] is None else cfg["seed"],  # mtlgraph always seeds its run
        "batch_scheduler": cfg["batch_scheduler"],
    }
    out["optimizer"] = _optimizer(cfg["optimizer"], cfg["optimizer_config"], problems)
    out.update(_lr_schedule(cfg["lr_scheduler"], cfg["lr_scheduler_config"], cfg["lr"], problems))
    out.update(_run_dir(cfg, problems))
    if problems:
        raise ConfigError(problems, header="cannot translate this Snorkel Trainer config:")
    return out


class Trainer(_Trainer):
    """Snorkel's ``Trainer(name=None, **config)`` with Snorkel 0.10's settings.

    Settings go through :func:`snorkel_to_mtlgraph`; with ``checkpointing=True`` the model holds
    the best checkpoint's weights after ``fit``, as in Snorkel.
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        self.name = name if name is not None else type(self).__name__
        self.snorkel_config: dict[str, Any] = dict(kwargs)
        super().__init__(**snorkel_to_mtlgraph(kwargs))

    def fit(  # type: ignore[override]  # Snorkel's signature
        self, model: _MultitaskClassifier, dataloaders: Sequence[_DictDataLoader]
    ) -> None:
        super().fit(model, dataloaders)
        if self.snorkel_config.get("checkpointing") and self.config.run_dir is not None:
            best = Path(self.config.run_dir) / CHECKPOINT_DIR / BEST
            if best.exists():
                model.load(best)
