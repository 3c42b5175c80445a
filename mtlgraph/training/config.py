"""The Trainer's settings (:class:`TrainerConfig`, one commented field each) and their checks:
types by the schema, values by :meth:`TrainerConfig.validate`, named components by their
registries' ``problems``; every problem at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mtlgraph._schema import plain_config
from mtlgraph.balancing import BALANCERS, Balancer
from mtlgraph.data.schedulers import SCHEDULERS, BatchScheduler
from mtlgraph.diagnostics import DiagnosticsConfig
from mtlgraph.graph.slices import SLICES
from mtlgraph.training.hooks import HOOKS, Hook
from mtlgraph.training.layers import LayerDecay
from mtlgraph.training.lr import LR_SCHEDULES
from mtlgraph.training.optim import optimizer_problems
from mtlgraph.training.writers import WRITERS, Writer

_AT_LEAST = {
    "n_epochs": 0,
    "weight_decay": 0,
    "warmup_steps": 0,
    "warmup_epochs": 0,
    "evaluation_freq": 0,
    "checkpoint_every": 0,
    "grad_accumulation_steps": 1,
    "seed": 0,
}
"""Numeric settings and their least value."""


@dataclass
class TrainerConfig:
    """Every setting of the :class:`~mtlgraph.Trainer`; ``Trainer(**kwargs)`` validates against it.

    Example:
        >>> from mtlgraph.training.config import TrainerConfig
        >>> TrainerConfig(lr=-1.0, optimizer={"name": "sgd", "momentun": 0.9}).validate()
        ... # doctest: +NORMALIZE_WHITESPACE
        ['lr: must be a positive number, got -1.0',
         "optimizer.momentun: optimizer 'sgd' takes no argument 'momentun' (did you mean
         'momentum'?); it takes 'dampening', 'differentiable', 'foreach', 'fused', 'maximize',
         'momentum', 'nesterov'"]
    """

    n_epochs: int = 1  # passes over the training loaders
    lr: float = 0.01  # base learning rate
    # a name (any torch.optim one), {"name": ..., **kwargs}, a dotted path, a class; see OPTIMIZERS
    optimizer: str | dict[str, Any] | Callable[..., Any] = "adam"
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    grad_clip: float | None = None  # max global L2 norm of the step's gradients; None = off
    lr_scheduler: str | dict[str, Any] | Callable[..., Any] = "constant"  # see LR_SCHEDULES
    warmup_steps: int = 0  # linear warm-up over this many optimizer steps
    # batch order; see SCHEDULERS
    batch_scheduler: str | dict[str, Any] | BatchScheduler | Callable[..., Any] = "shuffled"
    balancer: str | dict[str, Any] | Balancer | Callable[..., Any] = "sum"  # see BALANCERS
    # module-name glob pattern -> optimizer hyper-params (lr, weight_decay, ...)
    param_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # module names/patterns not trained
    amp: Literal["bf16", "fp16"] | None = None  # autocast dtype; fp16 (CUDA only) adds a scaler
    grad_accumulation_steps: int = 1  # batches (micro-steps) per optimizer step
    seed: int = 0  # seeds torch (inside fit only) and the batch scheduler
    progress_bar: bool = True  # one tqdm bar per epoch (hidden off a terminal)
    evaluation_freq: int = 1  # evaluate every N evaluation_units; 0 = only after training
    evaluation_unit: Literal["epochs", "steps"] = "epochs"  # unit of evaluation_freq
    train_split: str = "train"  # loaders whose dataset split is this are trained on
    eval_splits: list[str] = field(default_factory=lambda: ["valid"])  # splits scored at evaluation
    # --- run directory, logs and checkpoints (docs/checkpoints.md); all off by default
    run_dir: str | None = None  # directory for metrics.jsonl, TensorBoard events, checkpoints/
    writers: list[str | Writer] | None = None  # "jsonl", "tensorboard", Writers; None = both
    checkpoint_every: int = 0  # checkpoints/last.pt every N checkpoint_units; 0 = only at the end
    checkpoint_unit: Literal["steps", "epochs"] = "epochs"  # unit of checkpoint_every
    checkpoint_metric: str | None = None  # flat key that selects checkpoints/best.pt
    checkpoint_mode: Literal["max", "min"] | None = None  # better direction; None = the metric's
    # --- distributed training under torchrun (docs/distributed.md)
    distributed: Literal["auto", "off"] = "auto"  # auto: DDP when torchrun sets WORLD_SIZE > 1
    distributed_timeout: float = 300.0  # seconds a collective waits for the other ranks, then fails
    # --- interference diagnostics (docs/diagnostics.md); off by default
    diagnostics: DiagnosticsConfig | None = None  # interference probes every N steps; None = off
    # --- Snorkel users: warm-up in other units, slice scores at evaluation
    warmup_epochs: float = 0.0  # linear warm-up over the optimizer steps of this many epochs
    warmup_fraction: float = 0.0  # linear warm-up over this fraction (0-1) of all optimizer steps
    slices: list[str] = field(default_factory=list)  # registered slice functions scored at eval
    # --- data loading and sampling (docs/data.md)
    steps_per_epoch: int | None = None  # steps of an epoch under a sampling batch_scheduler;
    # None = the training loaders' batches summed (required with a stream of unknown length)
    # --- bad input (docs/training.md § Bad input)
    # a non-finite step loss or clipped gradient norm: raise TrainingError, drop the update, warn
    nonfinite: Literal["raise", "skip_batch", "warn"] = "raise"
    # --- fine-tuning pretrained modules (docs/training.md § Fine-tuning pretrained modules)
    # module name/pattern -> lr decay per layer down from the top, in (0, 1], or
    # {decay: ..., layers: [bottom-to-top submodule patterns]}; see LayerDecay
    layer_lr_decay: dict[str, float | LayerDecay] = field(default_factory=dict)
    # module names/patterns whose layers recompute their activations in the backward pass
    gradient_checkpointing: list[str] = field(default_factory=list)
    # log examples/s, tokens/s, peak RSS and CUDA memory at each evaluation (the progress bar
    # shows them regardless)
    throughput: bool = False
    # --- the user's hooks (docs/training.md): Hooks, registered names ("early_stopping"),
    # {name: ..., **kwargs} or dotted import paths; they fire after evaluation, before checkpoints
    hooks: list[str | dict[str, Any] | Hook | Callable[..., Any]] = field(default_factory=list)

    def validate(self) -> list[str]:
        """Value checks beyond types; one sentence per problem."""
        problems = self._check_numbers()
        problems += [
            f"{key}: entries must be non-empty strings, got {f!r}"
            for key in ("freeze", "gradient_checkpointing")
            for f in getattr(self, key)
            if not f
        ]
        for pattern, decay in self.layer_lr_decay.items():
            if isinstance(decay, LayerDecay):
                problems += [f"layer_lr_decay.{pattern}.{p}" for p in decay.problems()]
            else:  # a number: the decay itself
                problems += [
                    f"layer_lr_decay.{pattern}: {p.partition(': ')[2]}"
                    for p in LayerDecay(decay=decay).problems()
                ]
        problems += optimizer_problems(self.optimizer, self.weight_decay, self.param_groups)
        problems += self._check_snorkel_users()
        problems += BALANCERS.problems(self.balancer, "balancer", build=True)
        problems += LR_SCHEDULES.problems(self.lr_scheduler, "lr_scheduler")
        problems += self._check_outputs()
        for i, spec in enumerate(self.hooks):
            problems += HOOKS.problems(spec, f"hooks[{i}]", build=True)
        return problems

    def _check_snorkel_users(self) -> list[str]:
        """Warm-up given in one unit at most, and slices that are registered."""
        problems = []
        units = ("warmup_steps", "warmup_epochs", "warmup_fraction")
        given = [f"{k}={getattr(self, k)}" for k in units if getattr(self, k)]
        if len(given) > 1:
            problems.append(
                f"warm-up is set twice ({', '.join(given)}); set exactly one of warmup_steps, "
                "warmup_epochs or warmup_fraction"
            )
        if not 0 <= self.warmup_fraction <= 1:
            problems.append(f"warmup_fraction: must be in [0, 1], got {self.warmup_fraction}")
        problems += [f"slices: {SLICES.unknown(n)}" for n in self.slices if n not in SLICES]
        return problems

    def _check_numbers(self) -> list[str]:
        problems = [
            f"{key}: must be >= {least}, got {getattr(self, key)}"
            for key, least in _AT_LEAST.items()
            if getattr(self, key) < least
        ]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr: must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
        if not self.distributed_timeout > 0:
            problems.append(
                f"distributed_timeout: must be a positive number of seconds, got "
                f"{self.distributed_timeout}"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            problems.append(f"steps_per_epoch: must be >= 1 or null, got {self.steps_per_epoch}")
        return problems

    def _check_outputs(self) -> list[str]:
        problems = []
        for i, spec in enumerate(self.writers or []):
            problems += WRITERS.problems(spec, f"writers[{i}]", given=("ctx",))
        if self.checkpoint_mode is not None and self.checkpoint_metric is None:
            problems.append("checkpoint_mode: set checkpoint_metric too (the key best.pt tracks)")
        problems += SCHEDULERS.problems(self.batch_scheduler, "batch_scheduler", build=True)
        return problems


RESUME_APPLIED = frozenset(
    {
        "n_epochs",
        "lr",
        "weight_decay",
        "grad_clip",
        "lr_scheduler",
        "warmup_steps",
        "warmup_epochs",
        "warmup_fraction",
        "param_groups",  # values applied; other patterns are refused (see resume_conflicts)
        "optimizer",  # arguments applied; another optimizer is refused
        "amp",
        "progress_bar",
        "evaluation_freq",
        "evaluation_unit",
        "eval_splits",
        "run_dir",
        "writers",
        "checkpoint_every",
        "checkpoint_unit",
        "checkpoint_metric",
        "checkpoint_mode",
        "distributed",
        "distributed_timeout",
        "slices",
        "nonfinite",
        "hooks",
        "gradient_checkpointing",  # recomputes activations: the same values
        "throughput",
    }
)
"""Settings a resume may change: the resumed run uses the new value from its next step on
(a changed ``lr``, ``weight_decay``, optimizer argument or ``param_groups`` value overrides the
checkpoint's optimizer groups)."""

RESUME_REFUSED: dict[str, str] = {
    "optimizer": "the checkpoint holds another optimizer's state",
    "param_groups": "the checkpoint's optimizer has other parameter groups",
    "balancer": "the checkpoint holds another balancer's state",
    "batch_scheduler": "the interrupted epoch's batch order comes from the saved scheduler",
    "freeze": "the checkpoint's optimizer holds other parameters",
    "grad_accumulation_steps": "it changes what an optimizer step is (and the step count)",
    "seed": "the run's random states come from the checkpoint: a new seed would be ignored",
    "train_split": "the checkpoint's position is in the other split's batches",
    "steps_per_epoch": "the interrupted epoch's plan has the saved length",
    "diagnostics": "the saved probes were taken with the old settings",
    "layer_lr_decay": "the checkpoint's optimizer has other parameter groups (one per layer)",
}
"""Settings a resume refuses to change (exit status 2 in the CLI), each with the reason.
``optimizer`` and ``param_groups`` are refused only for another optimizer or other patterns."""


def optimizer_kind(spec: Any) -> str:
    """The optimizer a (plain) spec builds, without its arguments.

    Example:
        >>> import torch
        >>> from mtlgraph._schema import plain_config
        >>> optimizer_kind("Adam"), optimizer_kind({"name": "sgd", "momentum": 0.9})
        ('adam', 'sgd')
        >>> optimizer_kind(plain_config(torch.optim.Adam))  # a class, saved as its repr
        'adam'
    """
    if isinstance(spec, Mapping):
        spec = spec.get("name", spec.get("type"))
    if not isinstance(spec, str):
        spec = repr(spec)
    if spec.startswith("<class '") and spec.endswith("'>"):
        spec = spec[len("<class '") : -2]
    if spec.lower().startswith("torch.optim."):
        spec = spec.rsplit(".", 1)[-1]
    return spec.lower()


def resume_conflicts(
    saved: Mapping[str, Any], current: TrainerConfig, prefix: str = ""
) -> list[str]:
    """One problem per setting :data:`RESUME_REFUSED` lists whose value differs from the
    saved run's (``saved``: the checkpoint's plain trainer config), naming ``prefix + key``.

    Example:
        >>> saved = {"optimizer": "adam", "lr": 0.1, "seed": 0}
        >>> resume_conflicts(saved, TrainerConfig(optimizer="sgd", lr=0.5), "trainer.")
        ... # doctest: +NORMALIZE_WHITESPACE
        ["trainer.optimizer: the run has 'adam', this config 'sgd': the checkpoint holds another
          optimizer's state"]
    """
    now = plain_config(current)
    problems = []
    for key, why in RESUME_REFUSED.items():
        if key not in saved:
            continue
        old, new = saved[key], now[key]
        if key == "optimizer":
            old, new = optimizer_kind(old), optimizer_kind(new)
        elif key == "param_groups":
            old, new = sorted(old or {}), sorted(new or {})
        if old != new:
            problems.append(f"{prefix}{key}: the run has {old!r}, this config {new!r}: {why}")
    return problems


def optimizer_settings_changed(saved: Mapping[str, Any], current: TrainerConfig) -> bool:
    """Whether ``lr``, ``weight_decay``, the optimizer's arguments or ``param_groups`` values
    differ from the saved run's (then the resumed run's optimizer groups take the new ones)."""
    now = plain_config(current)
    keys = ("lr", "weight_decay", "optimizer", "param_groups")
    return any(k in saved and saved[k] != now[k] for k in keys)
