"""Checks and set-up before a fit's first step: the loaders, the config against the model,
and the data and model distributed over the ranks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.balancing import Balancer
from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.data.named import dataset_labels
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.metrics import active_rows
from mtlgraph.training.config import TrainerConfig
from mtlgraph.training.distributed import DistEnv, shard_eval_loader, shard_train_loader
from mtlgraph.training.labels import check_fit_labels
from mtlgraph.training.layers import checkpointing_problems, enable_checkpointing
from mtlgraph.training.optim import (
    freeze_modules,
    model_param_groups,
    resolve_modules,
)
from mtlgraph.training.step import BatchSource, StepLosses

logger = logging.getLogger(__name__)


def check_loaders(
    model: MultitaskClassifier,
    loaders: list[DictDataLoader],
    train: list[DictDataLoader],
    evals: list[DictDataLoader],
    train_split: str,
    eval_splits: Sequence[str] | None = None,
) -> None:
    """Every problem of the loaders (and then of their labels) at once.

    Raises:
        DataError: The problems.
    """
    problems: list[str] = []
    seen: dict[tuple[str, str, str], int] = {}  # (dataset, split, task) -> loader index
    for i, dl in enumerate(loaders):
        ds = getattr(dl, "dataset", None)
        if not isinstance(dl, DictDataLoader) or ds is None:
            problems.append(f"dataloaders[{i}] is a {type(dl).__name__}, not a DictDataLoader")
            continue
        for task in getattr(ds, "Y_dict", {}):  # keys collide only for the same task
            key = (ds.name, ds.split, task)
            if key in seen:
                problems.append(
                    f"dataloaders[{seen[key]}] and dataloaders[{i}] are both dataset "
                    f"'{ds.name}' split '{ds.split}' and both label task '{task}'; their score "
                    f"keys '{task}/{ds.name}/{ds.split}/...' would collide: rename one dataset"
                )
            seen[key] = i
    if not problems and not train:
        splits = sorted({dl.dataset.split for dl in loaders})
        problems.append(
            f"no loader has split '{train_split}' (found {quoted(splits)}); "
            "set train_split or the datasets' split"
        )
    for dl in train + evals if not problems else []:
        ds = dl.dataset
        if not dl.is_stream and len(dl) == 0:
            problems.append(f"dataset '{ds.name}' ({ds.split}) yields no batches")
        problems += [
            f"dataset '{ds.name}' ({ds.split}) labels '{label}', which is no task of the model"
            f"{did_you_mean(label, model.tasks)}; the model has {quoted(model.tasks)}"
            for label in dataset_labels(ds) or ()
            if label not in model.tasks
        ]
    if problems:
        raise DataError(
            problems, header="cannot train on these dataloaders:" if len(problems) > 1 else None
        )
    if eval_splits is not None:
        check_splits(loaders, train, evals, train_split, eval_splits)
    check_inputs(model, train + evals)
    check_fit_labels(model, train, evals)  # in-memory datasets, once


def check_splits(
    loaders: Sequence[DictDataLoader],
    train: Sequence[DictDataLoader],
    evals: Sequence[DictDataLoader],
    train_split: str,
    eval_splits: Sequence[str],
) -> None:
    """Name each loader that neither trains nor is scored: a warning when its split looks like a
    misspelling (``validation`` vs ``valid``) or nothing is scored, else an info line.

    Raises:
        ConfigError: An explicit (or misspelt) ``eval_splits`` entry that matches no loader.
    """
    used = {id(dl) for dl in [*train, *evals]}
    unused = [dl for dl in loaders if id(dl) not in used]
    known = sorted({dl.dataset.split for dl in loaders})
    for dl in unused:
        ds = dl.dataset
        hint = did_you_mean(ds.split, [train_split, *eval_splits])
        logger.log(
            logging.WARNING if hint or not evals else logging.INFO,
            "dataset '%s' split '%s' is neither train_split '%s' nor in eval_splits %s: it is "
            "not used during training%s",
            ds.name,
            ds.split,
            train_split,
            list(eval_splits),
            hint,
        )
    explicit = list(eval_splits) != ["valid"]
    unused_splits = [dl.dataset.split for dl in unused]
    problems = [
        f"eval_splits: no loader has split '{split}'{did_you_mean(split, known)}; the loaders "
        f"have {quoted(known)}: set eval_splits to the splits to score (or [] for none)"
        for split in eval_splits
        if split not in known and (explicit or did_you_mean(split, unused_splits))
    ]
    if problems:
        raise ConfigError(problems)


def check_inputs(model: MultitaskClassifier, loaders: Sequence[DictDataLoader]) -> None:
    """Floating input tensors of in-memory datasets must have the model's floating dtype.

    Raises:
        DataError: Each field of another floating dtype, with the conversion to use.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return
    problems = []
    for dl in loaders:
        ds = dl.dataset
        for field, value in getattr(ds, "X_dict", {}).items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dtype != dtype
            ):
                problems.append(
                    f"dataset '{ds.name}' ({ds.split}): input field '{field}' is {value.dtype}, "
                    f"the model's parameters are {dtype}; convert it (x.to({dtype})) or the "
                    f"model (model.to({value.dtype}))"
                )
    if problems:
        raise DataError(problems)


def prepare(
    model: MultitaskClassifier, balancer: Balancer, device: torch.device, cfg: TrainerConfig
) -> None:
    """Check the config against the model (patterns, layers, amp, balancer), all problems at
    once; then freeze modules, turn on gradient checkpointing and set the balancer up for the
    model's tasks.

    Raises:
        ConfigError: The problems.
    """
    frozen, problems = resolve_modules(model, "freeze", cfg.freeze)
    problems += model_param_groups(model, cfg.param_groups, frozen, cfg.layer_lr_decay, cfg.lr)[1]
    checkpointed = resolve_modules(model, "gradient_checkpointing", cfg.gradient_checkpointing)
    problems += checkpointed[1]
    for name in checkpointed[0]:
        problems += checkpointing_problems(model.module_pool[name], name)
    if cfg.amp == "fp16" and device.type != "cuda":
        problems.append(
            f"amp: 'fp16' needs a CUDA device (the model is on {device.type}); use "
            "amp='bf16' on this device, or move the model to CUDA"
        )
    try:
        balancer.setup(model.tasks)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, header="cannot train this model with this config:")
    freeze_modules(model, frozen)
    for name in checkpointed[0]:
        how = enable_checkpointing(model.module_pool[name])
        logger.info("gradient checkpointing on module '%s' (%s)", name, how)


def distribute(
    model: MultitaskClassifier,
    train: list[DictDataLoader],
    evals: list[DictDataLoader],
    env: DistEnv,
    device: torch.device,
) -> tuple[list[DictDataLoader], dict[int, DictDataLoader], DistributedDataParallel | None]:
    """Under DDP: sharded training loaders, evaluation shards, DDP around the loss computation
    (it averages the gradients of every backward). Otherwise the loaders as they are."""
    if not env.enabled:
        return train, {}, None
    shards = {id(dl): shard_eval_loader(dl, env) for dl in evals if not dl.is_stream}
    ddp = DistributedDataParallel(
        StepLosses(model),
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=True,  # a step only touches its tasks' modules
    )
    return [shard_train_loader(dl, env) for dl in train], shards, ddp


def batch_sources(
    model: MultitaskClassifier, train: Sequence[DictDataLoader], device: torch.device
) -> list[BatchSource]:
    """Per training loader, found once: whether its batches need no move to ``device``, and
    which tasks' labels hold no ignore value (no mask needed)."""
    sources = []
    for dl in train:
        ds = dl.dataset
        parts = [*getattr(ds, "X_dict", {}).values(), *getattr(ds, "Y_dict", {}).values()]
        if not isinstance(ds, DictDataset) or not all(isinstance(v, torch.Tensor) for v in parts):
            sources.append(BatchSource(ds.name))
            continue
        all_active = frozenset(
            task_name
            for task_name, labels in ds.Y_dict.items()
            if task_name in model.tasks
            and bool(active_rows(labels, model.tasks[task_name].ignore_value).all())
        )
        on_device = all(v.device == device for v in parts)
        sources.append(BatchSource(ds.name, all_active, on_device))
    return sources


CPU_UPDATE: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.Adam: "fused",
    torch.optim.AdamW: "fused",
    torch.optim.Adagrad: "fused",
    torch.optim.SGD: "foreach",
}
"""The faster update mtlgraph picks on the CPU, where PyTorch's default is a Python loop over
the parameters. ``fused`` (one kernel call per group) equals the loop to float rounding, not bit
for bit (relative 1e-6 after 2,000 steps); ``foreach`` (one call per operation) equals it bit for
bit. SGD takes ``foreach``: its fused kernel fails on a step where some parameters already have
a momentum buffer and others do not (a head's first step after the trunk's).
``tests/training/test_fast_path.py`` checks both."""


def prefer_fast_update(optimizer: torch.optim.Optimizer) -> None:
    """Use the :data:`CPU_UPDATE` of the optimizer's class for its CPU groups that left
    ``foreach``, ``fused`` and ``differentiable`` unset and hold only dense, real floating-point
    parameters."""
    mode = CPU_UPDATE.get(type(optimizer))
    if mode is None:
        return
    for group in optimizer.param_groups:
        if (
            group.get("foreach") is None
            and group.get("fused") is None
            and not group.get("differentiable")
            and all(
                p.device.type == "cpu" and p.is_floating_point() and not p.is_sparse
                for p in group["params"]
            )
        ):
            group[mode] = True
