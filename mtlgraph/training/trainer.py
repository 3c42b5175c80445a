"""Trainer: the training loop, readable top to bottom in :meth:`Trainer.fit`.

Each step takes one batch (or, with the ``mixed`` scheduler, one batch per loader) chosen by the
batch scheduler, computes the losses of the tasks those batches label, lets the balancer turn
them into gradients, clips, and steps the optimizer on the parameters the step touched. The
optimizer only visits the touched parameters, so a step's cost depends on the tasks in the batch,
not on how many tasks the model holds. With ``amp`` or ``grad_accumulation_steps`` a step runs
through :class:`~mtlgraph.training.optim.StepControl` (autocast, loss scaling, accumulation);
per-module
hyper-parameters and freezing are resolved by :mod:`mtlgraph.training.optim`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mtlgraph._io import move_to_device
from mtlgraph._schema import build
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.balancing import Balancer, GradientBalancer, StepContext, make_balancer
from mtlgraph.data.datasets import Batch, DictDataLoader
from mtlgraph.data.schedulers import BatchScheduler, make_scheduler, scheduler_names
from mtlgraph.diagnostics import (
    DiagnosticsConfig,
    DiagnosticsReport,
    InterferenceMonitor,
    remove_report,
    write_report,
)
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.graph.model import ExecutionPlan, MultitaskClassifier
from mtlgraph.metrics import make_key
from mtlgraph.training import checkpoint as ckpt
from mtlgraph.training.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    device_for,
    gather_predictions,
    gather_sums,
    process_group,
    shard_eval_loader,
    shard_train_loader,
)
from mtlgraph.training.optim import (
    StepControl,
    SubsetStepper,
    check_param_groups,
    freeze_modules,
    model_param_groups,
    resolve_freeze,
)
from mtlgraph.training.writers import WRITERS, Writer, WriterContext, flatten, open_writers

logger = logging.getLogger(__name__)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

LR_SCHEDULES: dict[str, dict[str, float]] = {
    # name -> its parameters and their defaults
    "constant": {},
    "linear": {"end_factor": 0.0},  # factor falls linearly from 1 to end_factor at the last step
    "cosine": {"min_factor": 0.0},  # half cosine from 1 to min_factor at the last step
    "exponential": {"gamma": 0.9},  # factor gamma ** epoch
    "step": {"step_size": 1, "gamma": 0.1},  # factor gamma ** (epoch // step_size)
}


@dataclass
class TrainerConfig:
    """Every setting of the :class:`Trainer`; ``Trainer(**kwargs)`` validates against it."""

    n_epochs: int = 1  # passes over the training loaders
    lr: float = 0.01  # base learning rate
    optimizer: str | dict[str, Any] = "adam"  # "adam" | "adamw" | "sgd", or {"name": ..., **kwargs}
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    grad_clip: float | None = None  # max global L2 norm of the step's gradients; None = off
    lr_scheduler: str | dict[str, Any] = "constant"  # see LR_SCHEDULES, or {"name": ..., **kwargs}
    warmup_steps: int = 0  # linear warm-up over this many optimizer steps
    batch_scheduler: str | dict[str, Any] | BatchScheduler = (
        "shuffled"  # batch order, see schedulers
    )
    balancer: str | dict[str, Any] | Balancer = "sum"  # how task losses combine, see balancing
    param_groups: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # module-name glob pattern -> optimizer hyper-params (lr, weight_decay, ...)
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

    def validate(self) -> list[str]:
        """Value checks beyond types; one sentence per problem."""
        problems = []
        if self.n_epochs < 0:
            problems.append(f"n_epochs: must be >= 0, got {self.n_epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr: must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.evaluation_freq < 0:
            problems.append(f"evaluation_freq: must be >= 0, got {self.evaluation_freq}")
        if not self.distributed_timeout > 0:
            problems.append(
                f"distributed_timeout: must be a positive number of seconds, got "
                f"{self.distributed_timeout}"
            )
        if self.grad_accumulation_steps < 1:
            problems.append(
                f"grad_accumulation_steps: must be >= 1, got {self.grad_accumulation_steps}"
            )
        problems += [
            f"freeze: entries must be non-empty strings, got {f!r}" for f in self.freeze if not f
        ]
        optimizer_params = {n: _init_params(c) for n, c in OPTIMIZERS.items()}
        problems += _check_named("optimizer", self.optimizer, optimizer_params)
        opt_name = self.optimizer if isinstance(self.optimizer, str) else self.optimizer.get("name")
        if opt_name in optimizer_params:
            problems += check_param_groups(
                self.param_groups, optimizer_params[str(opt_name)] | {"lr"}
            )
        if not isinstance(self.balancer, Balancer):
            try:
                make_balancer(self.balancer)
            except ConfigError as e:
                problems += [f"balancer: {p}" for p in e.problems]
        problems += _check_named(
            "lr_scheduler", self.lr_scheduler, {n: set(p) for n, p in LR_SCHEDULES.items()}
        )
        problems += self._check_outputs()
        return problems

    def _check_outputs(self) -> list[str]:
        # Files need run_dir; without one (a YAML config checked before the CLI picks its run
        # directory) fit() warns that nothing is written.
        problems = []
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        for i, spec in enumerate(self.writers or []):
            if isinstance(spec, str) and spec not in WRITERS:
                problems.append(
                    f"writers[{i}]: unknown writer {spec!r}{did_you_mean(spec, WRITERS)}; "
                    f"known: {quoted(WRITERS)}"
                )
        if self.checkpoint_mode is not None and self.checkpoint_metric is None:
            problems.append("checkpoint_mode: set checkpoint_metric too (the key best.pt tracks)")
        scheduler = self.batch_scheduler
        if not isinstance(scheduler, BatchScheduler):
            name = scheduler if isinstance(scheduler, str) else scheduler.get("name")
            if name not in scheduler_names():
                problems.append(
                    f"batch_scheduler: unknown scheduler {name!r}"
                    f"{did_you_mean(str(name), scheduler_names())}; known: "
                    f"{quoted(scheduler_names())}"
                )
        return problems


def _init_params(cls: Callable[..., Any]) -> set[str]:
    return {p for p in inspect.signature(cls).parameters if p not in ("params", "lr")}


def _check_named(
    key: str, spec: str | Mapping[str, Any], known: Mapping[str, set[str]]
) -> list[str]:
    """Validate a ``name`` or ``{"name": ..., **kwargs}`` setting against known names/kwargs."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    else:
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
    if name not in known:
        return [
            f"{key}: unknown name {name!r}{did_you_mean(str(name), known)}; known: {quoted(known)}"
        ]
    return [
        f"{key}.{k}: '{name}' takes no argument '{k}'{did_you_mean(k, known[name])}; "
        f"it takes {quoted(known[name]) or 'none'}"
        for k in kwargs
        if k not in known[name]
    ]


def _named(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    kwargs = dict(spec)
    return str(kwargs.pop("name")), kwargs


def lr_factor_fn(
    schedule: str | Mapping[str, Any], warmup_steps: int, total_steps: int, steps_per_epoch: int
) -> Callable[[int], float] | None:
    """Return ``step -> lr factor`` for a schedule, or ``None`` when the factor is always 1."""
    name, kwargs = _named(schedule)
    params = {**LR_SCHEDULES[name], **kwargs}
    if name == "constant" and warmup_steps == 0:
        return None
    span = max(1, total_steps - warmup_steps)
    per_epoch = max(1, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = min(1.0, (step - warmup_steps) / span)
        if name == "linear":
            return 1.0 - (1.0 - params["end_factor"]) * p
        if name == "cosine":
            return params["min_factor"] + (1 - params["min_factor"]) * 0.5 * (
                1 + math.cos(math.pi * p)
            )
        if name == "exponential":
            return float(params["gamma"] ** (step // per_epoch))
        if name == "step":
            return float(params["gamma"] ** ((step // per_epoch) // int(params["step_size"])))
        return 1.0

    return factor


class Trainer:
    """Trains a :class:`~mtlgraph.MultitaskClassifier` on many loaders at once.

    Args:
        **config: Settings of :class:`TrainerConfig` (``n_epochs``, ``lr``, ``optimizer``,
            ``lr_scheduler``, ``batch_scheduler``, ``balancer``, ``param_groups``, ``freeze``,
            ``amp``, ``grad_accumulation_steps``, ``grad_clip``, ``seed``, ...). Unknown keys and
            wrong types are rejected at construction, all at once, with suggestions; settings
            that name modules are checked against the model when :meth:`fit` starts. With
            ``run_dir``, ``fit`` writes ``metrics.jsonl``, TensorBoard events and checkpoints
            there (``checkpoint_every``, ``checkpoint_metric``; docs/checkpoints.md), and
            ``fit(..., resume_from=run_dir)`` continues an interrupted run exactly. With
            ``diagnostics`` (e.g. ``{"every": 50}``) the run measures which tasks help and
            which hurt each other (docs/diagnostics.md).

    Attributes:
        config: The validated :class:`TrainerConfig`.
        history: One record per evaluation: ``{"epoch", "step", "model/all/train/loss",
            "model/all/train/lr", "<task>/<dataset>/train/loss", <validation scores>...}``;
            with ``diagnostics``, also one record per probe (``{"epoch", "step",
            "diagnostics/..."}``).
        diagnostics: The :class:`~mtlgraph.diagnostics.DiagnosticsReport` of the last ``fit``
            (``None`` without ``diagnostics``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import (DictDataLoader, DictDataset, MultitaskClassifier, Operation,
        ...                       Task, Trainer)
        >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
        >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
        >>> model = MultitaskClassifier([task])
        >>> loaders = [DictDataLoader(DictDataset("d", s, {"x": x}, {"t": y}), batch_size=16)
        ...            for s in ("train", "valid")]
        >>> trainer = Trainer(n_epochs=5, lr=0.1, progress_bar=False)
        >>> trainer.fit(model, loaders)
        >>> trainer.history[-1]["t/d/valid/accuracy"] > 0.8
        True
    """

    def __init__(self, **config: Any) -> None:
        problems: list[str] = []
        cfg = build(TrainerConfig, config, "", problems)
        if problems:
            raise ConfigError(problems, header="invalid Trainer config:")
        self.config: TrainerConfig = cfg
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        # The resolved experiment config (set by mtlgraph.experiment.build from YAML); saved in
        # checkpoints
        # and, flattened, as TensorBoard hparams.
        self.experiment_config: Mapping[str, Any] | None = None
        self._writers: list[Writer] = []
        self._finished = False
        self._checkpointer: ckpt.Checkpointer | None = None
        self._env = DistEnv()
        self._ddp: DistributedDataParallel | None = None
        self._manual_sync = False
        self._eval_shards: dict[int, DictDataLoader] = {}
        self._monitor: InterferenceMonitor | None = None
        # The interference report of the last fit (None without ``diagnostics``).
        self.diagnostics: DiagnosticsReport | None = None

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        model: MultitaskClassifier,
        dataloaders: Sequence[DictDataLoader],
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train ``model`` on the loaders whose split is ``train_split``.

        Loaders of ``eval_splits`` are scored at each evaluation; others are ignored. Torch's
        global random state is seeded with ``seed`` inside this call and restored after it.

        Args:
            model: The model.
            dataloaders: Loaders of every split.
            resume_from: A checkpoint file or a run directory (its ``checkpoints/last.pt``):
                continue that run exactly where it stopped, mid-epoch included. Pass the same
                model structure, loaders and config as the interrupted run.
        """
        cfg = self.config
        loaders = list(dataloaders)
        train = [dl for dl in loaders if getattr(dl.dataset, "split", None) == cfg.train_split]
        evals = [dl for dl in loaders if getattr(dl.dataset, "split", None) in cfg.eval_splits]
        self._check_loaders(model, loaders, train, evals)
        env = DistEnv.from_env() if cfg.distributed == "auto" else DistEnv()
        device = model.device
        if env.enabled:  # one process per device: cuda:<local rank>
            device = device_for(env, device)
            model.to(device)
        self._env = env
        state = None
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, map_location=device)
        devices = [device.index or 0] if device.type == "cuda" else []
        self._writers, self._finished = [], False
        with (
            process_group(env, device, cfg.distributed_timeout),
            torch.random.fork_rng(devices=devices),
        ):
            torch.manual_seed(cfg.seed)
            try:
                self._fit(model, train, evals, state)
            finally:  # writers flush even when training fails; hparams only when it succeeded
                final = self.history[-1] if self._finished and self.history else None
                for writer in self._writers:
                    writer.close(final)
                self._ddp = None

    def _fit(
        self,
        model: MultitaskClassifier,
        train: list[DictDataLoader],
        evals: list[DictDataLoader],
        state: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = self.config
        device = model.device
        scheduler = make_scheduler(cfg.batch_scheduler, cfg.seed)
        balancer = make_balancer(cfg.balancer)
        self._prepare(model, balancer, device)
        balancer.to(device)
        env = self._env
        self._ddp = None
        self._eval_shards = {}
        if env.enabled:  # shard the data; DDP averages the gradients of every backward
            train = [shard_train_loader(dl, env) for dl in train]
            self._eval_shards = {id(dl): shard_eval_loader(dl, env) for dl in evals}
            self._ddp = DistributedDataParallel(
                StepLosses(model),
                device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=True,  # a step only touches its tasks' modules
            )
        # Gradient methods take per-task gradients with autograd.grad, which DDP does not see:
        # they run without DDP's reduction and average their gradients through ctx.reduce.
        self._manual_sync = env.enabled and isinstance(balancer, GradientBalancer)
        stepper = SubsetStepper(self._make_optimizer(model, balancer), balancer.task_parameters)
        control = None
        if cfg.amp is not None or cfg.grad_accumulation_steps > 1:
            control = StepControl(cfg.amp, cfg.grad_accumulation_steps, cfg.grad_clip, device)
        batch_counts = [len(dl) for dl in train]
        micro_steps = len(copy.deepcopy(scheduler).epoch_plan(batch_counts))
        steps_per_epoch = -(-micro_steps // cfg.grad_accumulation_steps)
        lr_factor = lr_factor_fn(
            cfg.lr_scheduler, cfg.warmup_steps, cfg.n_epochs * steps_per_epoch, steps_per_epoch
        )
        self._window: list[tuple[str, str, torch.Tensor, int]] = []
        self.global_step = 0
        pos = ckpt.Progress()
        resumed_losses: list[tuple[str, str, torch.Tensor, int]] = []
        monitor = self._monitor = self._open_diagnostics(state)
        if state is not None:
            pos, resumed_losses = self._restore(state, model, stepper, balancer, scheduler, train)
        self._checkpointer = self._open_checkpointer(model, train, evals, state)
        if env.is_main:  # rank 0 alone writes logs
            self._writers = self._open_writers(None if state is None else pos.global_step)
        self._pos = pos
        self._train = train
        self._plan: list[tuple[int, ...]] = []
        self._scheduler_state: dict[str, Any] = scheduler.state_dict()
        self._epoch_losses: list[tuple[str, str, torch.Tensor, int]] = []
        if state is not None:
            ckpt.set_rng_state(state["rng"])  # last: building the pieces above may draw numbers

        start_epoch = pos.epoch
        model.train()
        for epoch in range(start_epoch, cfg.n_epochs):
            for dl in train:
                dl.set_epoch(epoch)
            self._scheduler_state = scheduler.state_dict()  # resume recomputes the plan
            plan = self._plan = scheduler.epoch_plan(batch_counts)
            iterators: list[Iterator[Batch] | None] = [None] * len(train)
            self._epoch_losses = epoch_losses = []
            first = 0
            if state is not None and epoch == start_epoch:  # the interrupted epoch
                first = pos.step_in_epoch
                self._epoch_losses = epoch_losses = resumed_losses
                iterators = ckpt.resume_iterators(train, plan[:first], state)
            bar = tqdm(
                total=len(plan),
                initial=first,
                desc=f"epoch {epoch + 1}/{cfg.n_epochs}",
                leave=False,
                disable=None if cfg.progress_bar and env.is_main else True,
            )
            for k, step in enumerate(plan[first:], first):
                batches = [(train[i].dataset.name, _next_batch(train, iterators, i)) for i in step]
                if lr_factor is not None:
                    stepper.set_lr_factor(lr_factor(self.global_step))
                if control is None:
                    records = self._train_step(model, balancer, stepper, batches, device)
                    stepped = True
                else:
                    records, stepped = self._micro_step(
                        model, balancer, stepper, control, batches, device, k == len(plan) - 1
                    )
                epoch_losses += records
                self._window += records
                bar.update()
                if not stepped:
                    continue
                self.global_step += 1
                if cfg.progress_bar and records and self.global_step % 20 == 0:
                    bar.set_postfix(
                        loss=f"{float(records[0][2]):.4f}",
                        lr=f"{stepper.full_groups[0]['lr']:.3g}",
                        refresh=False,
                    )
                pos.epoch, pos.step_in_epoch, pos.global_step = epoch, k + 1, self.global_step
                if monitor is not None and self.global_step % monitor.every == 0:
                    self._probe(model, monitor, stepper, epoch + 1)
                if (
                    cfg.evaluation_unit == "steps"
                    and cfg.evaluation_freq
                    and self.global_step % cfg.evaluation_freq == 0
                ):
                    self._evaluate(model, balancer, stepper, evals, epoch + 1)
                if self._checkpointer is not None and self._checkpointer.step_due(self.global_step):
                    self._save("last", model, stepper, balancer)
            bar.close()
            balancer.on_epoch_end(epoch, _task_means(gather_sums(_loss_sums(epoch_losses))))
            # The epoch is over: a checkpoint from here on resumes at the next one.
            pos.epoch, pos.step_in_epoch, pos.global_step = epoch + 1, 0, self.global_step
            self._scheduler_state = scheduler.state_dict()
            self._epoch_losses = []
            if (
                cfg.evaluation_unit == "epochs"
                and cfg.evaluation_freq
                and (epoch + 1) % cfg.evaluation_freq == 0
            ):
                self._evaluate(model, balancer, stepper, evals, epoch + 1)
            if self._checkpointer is not None and self._checkpointer.epoch_due(epoch + 1):
                self._save("last", model, stepper, balancer)
        if pos.last_logged != self.global_step and cfg.n_epochs > 0:
            self._evaluate(model, balancer, stepper, evals, cfg.n_epochs)
        if self._checkpointer is not None:
            self._save("last", model, stepper, balancer)
        if monitor is not None:
            self._report_diagnostics(monitor)
        self._finished = True
        self.balancer = balancer
        self.optimizer = stepper.optimizer

    # ------------------------------------------------------------------ run outputs, resume

    def _open_checkpointer(
        self,
        model: MultitaskClassifier,
        train: list[DictDataLoader],
        evals: list[DictDataLoader],
        state: Mapping[str, Any] | None,
    ) -> ckpt.Checkpointer | None:
        cfg = self.config
        if cfg.run_dir is None:
            return None
        mode = None
        if cfg.checkpoint_metric is not None:
            keys = ckpt.metric_keys(model, train, evals)
            mode = ckpt.metric_mode(cfg.checkpoint_metric, cfg.checkpoint_mode, keys)
        checkpointer = ckpt.Checkpointer(
            Path(cfg.run_dir) / ckpt.CHECKPOINT_DIR,
            cfg.checkpoint_every,
            cfg.checkpoint_unit,
            cfg.checkpoint_metric,
            mode,
            write=self._env.is_main,
        )
        if state is not None:
            checkpointer.load_best_state(state.get("best"))
        return checkpointer

    def _open_writers(self, resume_step: int | None) -> list[Writer]:
        cfg = self.config
        ctx = None
        files = [w for w in cfg.writers or [] if isinstance(w, str)]
        if cfg.run_dir is None and (files or cfg.checkpoint_every or cfg.checkpoint_metric):
            logger.warning(
                "run_dir is not set: no checkpoints or %s are written",
                ", ".join(files) or "log files",
            )
            specs = [w for w in cfg.writers or [] if not isinstance(w, str)]
            return open_writers(specs, None)
        if cfg.run_dir is not None:
            hparams = flatten(self._plain_config()["experiment"] or self._plain_config()["trainer"])
            ctx = WriterContext(Path(cfg.run_dir), resume_step, hparams)
        return open_writers(cfg.writers, ctx)

    def _plain_config(self) -> dict[str, Any]:
        return {
            "trainer": ckpt.plain_config(self.config),
            "experiment": ckpt.plain_config(self.experiment_config),
        }

    def _state(
        self,
        model: MultitaskClassifier,
        stepper: SubsetStepper,
        balancer: Balancer,
        rank_records: list[Any] | None = None,
    ) -> dict[str, Any]:
        """Everything needed to continue this run exactly (see :mod:`.checkpoint`)."""
        state = ckpt.training_state(
            model=model,
            optimizer=stepper.optimizer,
            base_lrs=stepper.base_lrs,
            balancer=balancer,
            progress=self._pos,
            loaders=self._train,
            done=self._plan[: self._pos.step_in_epoch],
            scheduler_state=self._scheduler_state,
            history=self.history,
            window=self._window,
            epoch_losses=self._epoch_losses,
            config=self._plain_config(),
            world_size=self._env.world_size,
            rank_records=rank_records,
        )
        if self._monitor is not None:
            state["diagnostics"] = self._monitor.state_dict()
        return state

    def _restore(
        self,
        state: Mapping[str, Any],
        model: MultitaskClassifier,
        stepper: SubsetStepper,
        balancer: Balancer,
        scheduler: BatchScheduler,
        train: list[DictDataLoader],
    ) -> tuple[ckpt.Progress, list[tuple[str, str, torch.Tensor, int]]]:
        """Load a checkpoint into the run's pieces; return its position and epoch losses."""
        run = ckpt.restore_training(
            state, model, balancer, scheduler, train, self._env.world_size, self._env.rank
        )
        stepper.load_state_dict(state["optimizer"])
        self.global_step = run.progress.global_step
        self.history = run.history
        self._window = run.window
        return run.progress, run.epoch_losses

    # ------------------------------------------------------------------ diagnostics

    def _open_diagnostics(self, state: Mapping[str, Any] | None) -> InterferenceMonitor | None:
        """The run's interference monitor (``None`` when off, and on DDP ranks other than 0:
        probes use no collectives, rank 0 alone probes and reports), its sums restored on
        resume; a fresh run in a used run directory drops the old run's report."""
        cfg = self.config
        if not self._env.is_main:
            return None
        if state is None and cfg.run_dir is not None:
            remove_report(cfg.run_dir)
        if cfg.diagnostics is None:
            return None
        monitor = InterferenceMonitor(cfg.diagnostics, cfg.seed)
        if state is not None and state.get("diagnostics") is not None:
            monitor.load_state_dict(state["diagnostics"])
        elif state is not None:
            logger.warning(
                "the checkpoint holds no diagnostics state: the report counts probes from step %d",
                state["progress"]["global_step"],
            )
        return monitor

    def _probe(
        self,
        model: MultitaskClassifier,
        monitor: InterferenceMonitor,
        stepper: SubsetStepper,
        epoch: int,
    ) -> None:
        """One interference probe (it leaves training untouched); its values are a history
        record of their own, sent to the writers."""
        values = monitor.probe(model, self._train, stepper.full_groups, self.global_step)
        record = {"epoch": float(epoch), "step": float(self.global_step), **values}
        self.history.append(record)
        for writer in self._writers:
            writer.write(record)

    def _report_diagnostics(self, monitor: InterferenceMonitor) -> None:
        """``self.diagnostics``, logged, and written to the run directory (rank 0)."""
        report = self.diagnostics = monitor.report()
        logger.info("%s", report.to_text())
        if self.config.run_dir is not None:  # only rank 0 has a monitor
            write_report(report, self.config.run_dir)

    def _evaluate(
        self,
        model: MultitaskClassifier,
        balancer: Balancer,
        stepper: SubsetStepper,
        evals: list[DictDataLoader],
        epoch: int,
    ) -> None:
        """Log a record; keep ``best.pt`` when the checkpoint metric improved."""
        record = self._log(model, balancer, stepper, evals, epoch)
        self._pos.last_logged = self.global_step
        checkpointer = self._checkpointer
        if checkpointer is not None and checkpointer.improved(record):
            self._save("best", model, stepper, balancer)

    def _save(
        self, which: str, model: MultitaskClassifier, stepper: SubsetStepper, balancer: Balancer
    ) -> None:
        """Write ``last.pt`` or ``best.pt`` on rank 0; every rank waits until it is complete."""
        checkpointer = self._checkpointer
        assert checkpointer is not None
        rank_records = None
        if self._env.enabled:  # each rank resumes with its own loss records
            rank_records = all_gather_objects((_cpu(self._window), _cpu(self._epoch_losses)))
        if checkpointer.write:
            state = self._state(model, stepper, balancer, rank_records)
            (checkpointer.save_last if which == "last" else checkpointer.save_best)(state)
        barrier()

    def _losses(
        self, model: MultitaskClassifier, batches: list[tuple[str, Batch]], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict[str, int], list[tuple[str, str, torch.Tensor, int]]]:
        """The step's losses, through DDP's forward when training distributed."""
        if self._ddp is not None:
            return self._ddp(batches, device)
        return step_losses(model, batches, device)

    def _context(
        self,
        backward: Callable[[torch.Tensor], None],
        scale: Callable[[torch.Tensor], torch.Tensor],
        model: MultitaskClassifier,
        plan: ExecutionPlan,
        counts: dict[str, int],
    ) -> StepContext:
        return StepContext(
            tasks=model.tasks,
            plan=plan,
            counts=counts,
            backward=backward,
            scale=scale,
            step=self.global_step,
            reduce=all_reduce_mean if self._env.enabled else _identity,
        )

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync`` for gradient balancers (they average through ``ctx.reduce``)."""
        if self._manual_sync and self._ddp is not None:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def _sync_balancer(self, balancer: Balancer, task_names: Sequence[str]) -> None:
        """Average learned balancer weights' gradients over ranks (they live outside DDP)."""
        if self._env.enabled:
            for p in _balancer_params(balancer, task_names):
                if p.grad is not None:
                    all_reduce_mean(p.grad)

    def _train_step(
        self,
        model: MultitaskClassifier,
        balancer: Balancer,
        stepper: SubsetStepper,
        batches: list[tuple[str, Batch]],
        device: torch.device,
    ) -> list[tuple[str, str, torch.Tensor, int]]:
        """One optimizer step on one or more batches (no amp, no accumulation: the fast path)."""
        with self._no_sync():
            losses, counts, records = self._losses(model, batches, device)
            if not losses:
                return records
            plan = model.plan(losses)
            ctx = self._context(_backward, _identity, model, plan, counts)
            balancer.backward(losses, ctx)
        self._sync_balancer(balancer, plan.task_names)
        stepper.step(plan, self.config.grad_clip)
        for p in plan.parameters:
            p.grad = None
        for p in _balancer_params(balancer, plan.task_names):
            p.grad = None
        return records

    def _micro_step(
        self,
        model: MultitaskClassifier,
        balancer: Balancer,
        stepper: SubsetStepper,
        control: StepControl,
        batches: list[tuple[str, Batch]],
        device: torch.device,
        end_of_epoch: bool,
    ) -> tuple[list[tuple[str, str, torch.Tensor, int]], bool]:
        """Forward (under autocast) and backward of one micro-step; steps the optimizer when
        ``grad_accumulation_steps`` micro-steps (or the epoch's last ones) have accumulated.

        Returns:
            The loss records and whether the optimizer stepped.
        """
        with self._no_sync():
            with control.autocast():
                losses, counts, records = self._losses(model, batches, device)
            if losses:
                plan = model.plan(losses)
                ctx = self._context(control.backward, control.scale, model, plan, counts)
                balancer.backward(losses, ctx)
                control.add(plan)
        if losses:
            self._sync_balancer(balancer, plan.task_names)
        if not control.ready(end_of_epoch):
            return records, False
        names = list(dict.fromkeys(t for p in control.pending for t in p.task_names))
        control.step(stepper, _balancer_params(balancer, names))
        return records, True

    # ------------------------------------------------------------------ pieces

    def _prepare(
        self, model: MultitaskClassifier, balancer: Balancer, device: torch.device
    ) -> None:
        """Check the config against the model (patterns, amp, balancer), all problems at once;
        then freeze modules and set the balancer up for the model's tasks."""
        cfg = self.config
        frozen, problems = resolve_freeze(model, cfg.freeze)
        problems += model_param_groups(model, cfg.param_groups, frozen)[1]
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

    def _make_optimizer(
        self, model: MultitaskClassifier, balancer: Balancer
    ) -> torch.optim.Optimizer:
        """One optimizer: the model's groups (default first, then ``param_groups`` patterns;
        frozen parameters left out) and the balancer's learned weights in their own group."""
        name, kwargs = _named(self.config.optimizer)
        groups, _ = model_param_groups(model, self.config.param_groups)
        balancer_params = [p for p in balancer.parameters() if p.requires_grad]
        if balancer_params:
            groups.append(
                {
                    "params": balancer_params,
                    "scope": "balancer",
                    "weight_decay": 0.0,
                    **balancer.optimizer_options(),
                }
            )
        return OPTIMIZERS[name](
            groups, lr=self.config.lr, weight_decay=self.config.weight_decay, **kwargs
        )

    def _log(
        self,
        model: MultitaskClassifier,
        balancer: Balancer,
        stepper: SubsetStepper,
        evals: list[DictDataLoader],
        epoch: int,
    ) -> dict[str, float]:
        record: dict[str, float] = {"epoch": float(epoch), "step": float(self.global_step)}
        record.update(_train_losses(gather_sums(_loss_sums(self._window))))
        self._window = []
        record["model/all/train/lr"] = float(stepper.full_groups[0]["lr"])
        for group in stepper.full_groups[1:]:
            if "name" in group:  # a param_groups pattern
                record[f"model/all/train/lr/{group['name']}"] = float(group["lr"])
        for task_name, w in sorted(balancer.weights().items()):
            record[f"model/all/train/weight/{task_name}"] = float(w)
        if evals:
            scores = self._score(model, evals)
            record.update(scores)
            balancer.on_evaluation(scores)
        self.history.append(record)
        for writer in self._writers:
            writer.write(record)
        # The log line is a summary (training loss, evaluation scores); writers get everything.
        shown = [
            k
            for k in record
            if k == "model/all/train/loss" or (k.count("/") == 3 and k.split("/")[2] != "train")
        ]
        logger.log(
            logging.INFO if self._env.is_main else logging.DEBUG,
            "epoch %d step %d: %s",
            epoch,
            self.global_step,
            ", ".join(f"{k}={record[k]:.4g}" for k in shown),
        )
        return record

    def _score(self, model: MultitaskClassifier, evals: list[DictDataLoader]) -> dict[str, float]:
        """``model.score(evals)``; under DDP each rank predicts its shard of whole batches and
        the gathered predictions are scored, equal to a single-process evaluation."""
        if not self._env.enabled:
            return model.score(evals)
        scores: dict[str, float] = {}
        for loader in evals:
            shard = self._eval_shards[id(loader)]
            local = model.predict(shard, return_preds=True)
            indices = shard.sampler.indices  # type: ignore[attr-defined]
            full = gather_predictions(local, indices, len(loader.dataset))
            model.score_predictions(full, loader.dataset.name, loader.dataset.split, into=scores)
        return scores

    def _check_loaders(
        self,
        model: MultitaskClassifier,
        loaders: list[DictDataLoader],
        train: list[DictDataLoader],
        evals: list[DictDataLoader],
    ) -> None:
        problems: list[str] = []
        seen: dict[tuple[str, str], int] = {}
        for i, dl in enumerate(loaders):
            ds = getattr(dl, "dataset", None)
            if not isinstance(dl, DictDataLoader) or ds is None:
                problems.append(f"dataloaders[{i}] is a {type(dl).__name__}, not a DictDataLoader")
                continue
            key = (ds.name, ds.split)
            if key in seen:
                problems.append(
                    f"dataloaders[{seen[key]}] and dataloaders[{i}] are both dataset '{ds.name}' "
                    f"split '{ds.split}'; their score keys would collide"
                )
            seen[key] = i
        if not problems and not train:
            splits = sorted({dl.dataset.split for dl in loaders})
            problems.append(
                f"no loader has split '{self.config.train_split}' (found {quoted(splits)}); "
                "set train_split or the datasets' split"
            )
        for dl in train + evals if not problems else []:
            ds = dl.dataset
            if len(dl) == 0:
                problems.append(f"dataset '{ds.name}' ({ds.split}) yields no batches")
            for label in ds.Y_dict:
                if label not in model.tasks:
                    problems.append(
                        f"dataset '{ds.name}' ({ds.split}) labels '{label}', which is no task of "
                        f"the model{did_you_mean(label, model.tasks)}; the model has "
                        f"{quoted(model.tasks)}"
                    )
        if problems:
            raise DataError(
                problems, header="cannot train on these dataloaders:" if len(problems) > 1 else None
            )


def step_losses(
    model: MultitaskClassifier,
    batches: list[tuple[str, Batch]],
    device: torch.device,
    keep_empty: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, int], list[tuple[str, str, torch.Tensor, int]]]:
    """Per-task losses and label counts of a step's batches, and (task, dataset, loss, n)
    records for logging. A task labelled by two batches of the step gets their count-weighted
    mean loss."""
    losses: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    records = []
    for dataset_name, (X, Y) in batches:
        batch_losses, batch_counts = model.calculate_loss(
            move_to_device(X, device), move_to_device(Y, device), keep_empty=keep_empty
        )
        for task_name, loss in batch_losses.items():
            n = batch_counts[task_name]
            records.append((task_name, dataset_name, loss.detach(), n))
            if task_name in losses:
                m = counts[task_name]
                if m + n:
                    losses[task_name] = (losses[task_name] * m + loss * n) / (m + n)
                else:  # both empty (keep_empty): stay a connected zero
                    losses[task_name] = losses[task_name] + loss
                counts[task_name] = m + n
            else:
                losses[task_name], counts[task_name] = loss, n
    return losses, counts, records


class StepLosses(nn.Module):
    """The model's loss computation as a module, so DDP can wrap it (its forward is a step's).

    Every rank reports every task its batches label, with a connected zero loss where its shard
    had no active label, so all ranks run the same operations and reductions.
    """

    def __init__(self, model: MultitaskClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batches: list[tuple[str, Batch]], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict[str, int], list[tuple[str, str, torch.Tensor, int]]]:
        return step_losses(self.model, batches, device, keep_empty=True)


Records = list[tuple[str, str, torch.Tensor, int]]


def _cpu(records: Records) -> Records:
    return [(t, d, loss.detach().float().cpu(), n) for t, d, loss, n in records]


def _balancer_params(balancer: Balancer, task_names: Sequence[str]) -> list[torch.nn.Parameter]:
    """The balancer parameters a step on ``task_names`` touched."""
    params = balancer.task_parameters(task_names)
    return list(balancer.parameters()) if params is None else params


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _next_batch(
    loaders: list[DictDataLoader], iterators: list[Iterator[Batch] | None], i: int
) -> Batch:
    """Next batch of loader ``i``; a loader that runs out starts over (the mixed scheduler)."""
    it = iterators[i]
    if it is not None:
        batch = next(it, None)
        if batch is not None:
            return batch
    it = iterators[i] = loaders[i].iterate()
    return next(it)


def _loss_sums(window: list[tuple[str, str, torch.Tensor, int]]) -> dict[Any, list[float]]:
    """``{(task, dataset): [Σ loss·n, Σ n]}`` over (task, dataset, loss, n) records."""
    if not window:
        return {}
    values = torch.stack([r[2].float() for r in window]).tolist()
    sums: dict[Any, list[float]] = {}
    for (task_name, dataset_name, _, n), v in zip(window, values, strict=True):
        acc = sums.setdefault((task_name, dataset_name), [0.0, 0.0])
        acc[0] += v * n
        acc[1] += n
    return sums


def _train_losses(sums: Mapping[Any, list[float]]) -> dict[str, float]:
    """Count-weighted mean training loss per (task, dataset) and overall, from loss sums."""
    out = {make_key(t, d, "train", "loss"): s / c for (t, d), (s, c) in sums.items() if c}
    count = sum(c for _, c in sums.values())
    if count:
        out["model/all/train/loss"] = sum(s for s, _ in sums.values()) / count
    return out


def _task_means(sums: Mapping[Any, list[float]]) -> dict[str, float]:
    """Count-weighted mean loss per task, from loss sums."""
    per_task: dict[str, list[float]] = {}
    for (task_name, _), (s, c) in sums.items():
        acc = per_task.setdefault(task_name, [0.0, 0.0])
        acc[0] += s
        acc[1] += c
    return {t: s / c for t, (s, c) in per_task.items() if c}
