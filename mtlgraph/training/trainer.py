"""Trainer: the training loop, readable top to bottom in :meth:`FitLoop.run`.

Each step trains the batches the batch scheduler picks through the run's one
:class:`~mtlgraph.training.step.TrainStep`; side concerns are hooks (:mod:`.hooks`) and the
run's state is one :class:`~mtlgraph.training.state.RunState`. See ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtlgraph._schema import build, plain_config
from mtlgraph.balancing import BALANCERS, Balancer
from mtlgraph.data.datasets import DictDataLoader
from mtlgraph.data.schedulers import SCHEDULERS, SamplingScheduler, Step
from mtlgraph.diagnostics import DiagnosticsReport, InterferenceMonitor, remove_report
from mtlgraph.exceptions import ConfigError, TrainingInterrupted
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.model_file import load_model_state, model_entries
from mtlgraph.graph.slices import check_slices
from mtlgraph.metrics import make_key
from mtlgraph.signals import StopSignals
from mtlgraph.training import checkpoint as ckpt
from mtlgraph.training.config import TrainerConfig, optimizer_settings_changed, resume_conflicts
from mtlgraph.training.distributed import (
    Collectives,
    DistEnv,
    device_for,
    gather_predictions,
    process_group,
)
from mtlgraph.training.hooks import (
    HOOKS,
    CheckpointHook,
    EvaluationHook,
    Every,
    Hook,
    LogWriters,
    ProbeHook,
    ProgressBar,
    Run,
    overrides,
    throughput_meter,
)
from mtlgraph.training.labels import BatchLabelCheck
from mtlgraph.training.loading import TrainLoaders, batch_count, configure_sampling
from mtlgraph.training.lr import LR_SCHEDULES, is_constant, lr_factor_fn, resolve_warmup
from mtlgraph.training.optim import OPTIMIZERS, StepControl, SubsetStepper, make_optimizer
from mtlgraph.training.setup import (
    batch_sources,
    check_loaders,
    distribute,
    prefer_fast_update,
    prepare,
)
from mtlgraph.training.state import (
    LossRecord,
    Records,
    RunState,
    cpu_records,
    loss_sums,
    task_means,
    train_losses,
)
from mtlgraph.training.step import (
    NonfiniteGuard,
    StepLosses,
    TrainStep,
    step_losses,
)
from mtlgraph.training.writers import Writer, WriterContext, flatten, open_writers

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "FitLoop",
    "LossRecord",
    "RunState",
    "StepLosses",
    "Trainer",
    "TrainerConfig",
    "lr_factor_fn",
    "step_losses",
]

logger = logging.getLogger(__name__)


class Trainer:
    """Trains a :class:`~mtlgraph.MultitaskClassifier` on many loaders at once.

    Args:
        **config: Settings of :class:`TrainerConfig`; unknown keys and wrong types are rejected
            at construction, all at once (docs/training.md, docs/checkpoints.md).

    Attributes:
        config: The validated :class:`TrainerConfig`.
        state: The :class:`~mtlgraph.training.state.RunState` of the current or last ``fit``.
        history: ``state.history``: one record per evaluation (and per diagnostics probe).
        global_step: ``state.global_step``: optimizer steps of the current or last fit.
        balancer: The :class:`~mtlgraph.Balancer` of the current or last ``fit``; ``None`` before.
        optimizer: The torch optimizer of the current or last ``fit``; ``None`` before.
        diagnostics: The :class:`~mtlgraph.diagnostics.DiagnosticsReport` of the last ``fit``.
        experiment_config: The resolved YAML config (set by ``mtlgraph.experiment``).

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
        self.experiment_config: Mapping[str, Any] | None = None
        self.state = RunState()
        self.diagnostics: DiagnosticsReport | None = None
        self.balancer: Balancer | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def history(self) -> list[dict[str, float]]:
        """The records of the current or last ``fit`` (``state.history``)."""
        return self.state.history

    @property
    def global_step(self) -> int:
        """Optimizer steps of the current or last ``fit`` (``state.global_step``)."""
        return self.state.global_step

    def fit(
        self,
        model: MultitaskClassifier,
        dataloaders: Sequence[DictDataLoader],
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        """Train ``model`` on the loaders whose split is ``train_split``.

        Loaders of ``eval_splits`` are scored at each evaluation. Each call starts a fresh run
        unless ``resume_from`` continues a saved one; global random states are restored on return.
        The loop is :meth:`FitLoop.run`; its hooks are in ``mtlgraph/training/hooks.py``.

        SIGINT (Ctrl-C) and SIGTERM while the loop runs (``fit`` called in the main thread)
        finish the optimizer step in progress, write ``checkpoints/last.pt`` when ``run_dir``
        is set (whatever ``checkpoint_every`` says) and raise
        :class:`~mtlgraph.exceptions.TrainingInterrupted`; the previous signal handlers are back
        when ``fit`` returns or raises (docs/checkpoints.md).

        Args:
            model: The model.
            dataloaders: Loaders of every split.
            resume_from: A checkpoint file or a run directory (its ``checkpoints/last.pt``).

        Raises:
            TrainingInterrupted: A SIGINT or SIGTERM stopped the run after a whole step.
        """
        cfg = self.config
        train, evals = self._checked_loaders(model, dataloaders)
        env = DistEnv.from_env() if cfg.distributed == "auto" else DistEnv()
        device = model.device
        if env.enabled:  # one process per device: cuda:<local rank>
            device = device_for(env, device)
            model.to(device)
        saved = None if resume_from is None else ckpt.load_checkpoint(resume_from, device)
        self.state, self.diagnostics = RunState(), None
        cuda = [device.index or 0] if device.type == "cuda" else []
        with process_group(env, device, cfg.distributed_timeout), ckpt.global_rng_preserved(cuda):
            torch.manual_seed(cfg.seed)
            loop = FitLoop(self, model, train, evals, env, saved)
            self.balancer, self.optimizer = loop.balancer, loop.stepper.optimizer
            finished = False
            try:
                with loop.signals:
                    loop.run()
                finished = True
            finally:  # writers flush even when training fails; hparams only when it succeeded
                if loop.progress is not None:  # an interrupted or failed run's bar too
                    loop.progress.close()
                final = self.history[-1] if finished and self.history else None
                if loop.writers is not None:
                    loop.writers.close(self.history, final)
                if loop.probes is not None:
                    self.diagnostics = loop.probes.report
                # the DDP wrapper holds the process group: free it before the group is destroyed,
                # so that gloo's threads stop then, not at interpreter exit (an abort there)
                del loop
                if env.enabled:
                    gc.collect()

    def check(self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]) -> None:
        """Everything :meth:`fit` checks and builds before its first step, without training:
        the loaders and their labels, the batch scheduler, balancer, optimizer, LR schedule,
        hooks and probes (``fit``'s own set-up, in one process). Nothing is written: the run
        directory and the log writers are left out; the model and the global random states are
        left as found.

        Raises:
            ConfigError: Settings this model or these loaders cannot train with.
            DataError: Loaders or labels that do not fit the model.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from mtlgraph import (DictDataLoader, DictDataset, MultitaskClassifier,
            ...                       Operation, Task, Trainer)
            >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
            >>> x, y = torch.randn(8, 2), torch.ones(8).long()
            >>> loader = DictDataLoader(DictDataset("d", "train", {"x": x}, {"t": y}))
            >>> Trainer(steps_per_epoch=5).check(MultitaskClassifier([task]), [loader])
            Traceback (most recent call last):
            ...
            mtlgraph.exceptions.ConfigError: steps_per_epoch is set but batch_scheduler is ...
        """
        cfg = self.config
        train, evals = self._checked_loaders(model, dataloaders)
        if cfg.checkpoint_metric is not None:  # checked here: the dry run has no checkpoints
            keys = ckpt.metric_keys(model, train, evals, cfg.slices)
            ckpt.metric_mode(cfg.checkpoint_metric, cfg.checkpoint_mode, keys)
        dry = Trainer()  # fit's set-up on a copy of the config that writes nothing
        dry.config = dataclasses.replace(
            cfg,
            run_dir=None,
            writers=[],
            progress_bar=False,
            checkpoint_every=0,
            checkpoint_metric=None,
            checkpoint_mode=None,
        )
        dry.experiment_config = self.experiment_config
        trainable = [p.requires_grad for p in model.parameters()]
        with ckpt.global_rng_preserved():
            torch.manual_seed(cfg.seed)
            try:
                FitLoop(dry, model, train, evals, DistEnv(), None)
            finally:  # set-up freezes modules: give the model back as it was
                for p, flag in zip(model.parameters(), trainable, strict=True):
                    p.requires_grad_(flag)

    def _checked_loaders(
        self, model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]
    ) -> tuple[list[DictDataLoader], list[DictDataLoader]]:
        """The training and evaluation loaders, checked (loaders, labels, slice functions)."""
        cfg = self.config
        loaders = list(dataloaders)
        train = [dl for dl in loaders if getattr(dl.dataset, "split", None) == cfg.train_split]
        evals = [dl for dl in loaders if getattr(dl.dataset, "split", None) in cfg.eval_splits]
        check_loaders(model, loaders, train, evals, cfg.train_split, cfg.eval_splits)
        check_slices(cfg.slices, evals)  # bad slice functions fail before training
        return train, evals


def draw_counts(plan: Sequence[Step], names: Sequence[str]) -> dict[str, float]:
    """How many batches an epoch's ``plan`` draws from each training dataset, as record keys
    ``model/<dataset>/train/draws`` (loaders of one dataset name add up).

    Example:
        >>> draw_counts([(0,), (1,), (0,), (0, 1)], ["a", "b"])
        {'model/a/train/draws': 3.0, 'model/b/train/draws': 2.0}
    """
    out = {make_key("model", name, "train", "draws"): 0.0 for name in names}
    for step in plan:
        for i in step:
            out[make_key("model", names[i], "train", "draws")] += 1.0
    return out


class FitLoop:
    """One ``fit``: every piece built before the first step (in ``__init__``; a resume loads
    their states, the global random states last) and the loop (:meth:`run`)."""

    def __init__(
        self,
        trainer: Trainer,
        model: MultitaskClassifier,
        train: list[DictDataLoader],
        evals: list[DictDataLoader],
        env: DistEnv,
        saved: Mapping[str, Any] | None,
    ) -> None:
        cfg = self.cfg = trainer.config
        self.trainer, self.model, self.evals, self.env = trainer, model, evals, env
        self.state, self.comm, device = trainer.state, Collectives(env), model.device
        self.signals = StopSignals(self.comm.max_ if env.enabled else None, device)
        self.scheduler = SCHEDULERS.build(cfg.batch_scheduler, "batch_scheduler", seed=cfg.seed)
        self.balancer = BALANCERS.build(cfg.balancer, "balancer")
        prepare(model, self.balancer, device, cfg)
        self.balancer.to(device)
        self.train, self.eval_shards, ddp = distribute(model, train, evals, env, device)
        optimizer = make_optimizer(
            cfg.optimizer,
            model,
            self.balancer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            param_groups=cfg.param_groups,
            layer_lr_decay=cfg.layer_lr_decay,
        )
        prefer_fast_update(optimizer)
        self.stepper = SubsetStepper(optimizer, self.balancer.task_parameters)
        control = StepControl(cfg.amp, cfg.grad_accumulation_steps, cfg.grad_clip, device)
        guard = NonfiniteGuard(cfg.nonfinite, self.comm)
        self.meter = throughput_meter(cfg, device, env.is_main)
        self.step = TrainStep(
            model, self.balancer, self.stepper, control, device, self.comm, guard, ddp, self.meter
        )
        self.sources = batch_sources(model, self.train, device)
        self.state.batch_counts = [batch_count(dl) for dl in self.train]
        self.state.world_size = env.world_size
        configure_sampling(self.scheduler, self.train, cfg.steps_per_epoch, cfg.n_epochs)
        fresh = isinstance(self.scheduler, SamplingScheduler)
        check = BatchLabelCheck(model, self.train)  # streams' labels, per batch
        self.loaders = TrainLoaders(
            self.train, fresh_passes=fresh, check=check if any(check.checked) else None
        )
        self.lr_factor = self._lr_schedule()  # before a resume loads the scheduler's state
        self.resuming = saved is not None
        self._recorded_positions: list[int] = []  # the checkpoint's loader positions
        self.draws: dict[str, float] = {}  # batches drawn per dataset in the epoch's plan
        keys = ckpt.metric_keys(model, self.train, evals, cfg.slices)
        self.probes = self._probes(saved)
        hooks = self._hooks(guard, keys)
        self.run_view = Run(self.state, model, optimizer, self.balancer, hooks, keys)
        if saved is not None:
            self._restore(saved)
        if self.writers is not None:  # after the restore: they drop what followed the checkpoint
            self.writers.writers = self._open_writers(self._saved_step(saved))
        if saved is not None:
            ckpt.set_rng_state(saved["rng"])  # last: building the pieces above may draw numbers

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Every epoch's steps, the hooks' events after each optimizer step and epoch, then
        the end (:mod:`.hooks` lists the events and the hooks' order)."""
        cfg, state, run = self.cfg, self.state, self.run_view
        self.model.train()
        run.fit_start()
        for epoch in range(state.epoch, cfg.n_epochs):
            if state.stop_reason is not None:
                break
            scheduler_state = self.scheduler.state_dict()  # resume recomputes the plan from it
            plan = self.scheduler.epoch_plan(state.batch_counts)
            self._start_epoch(epoch, plan, scheduler_state)
            sources, next_batch = self.sources, self.loaders.next
            lr_factor, step, signals = self.lr_factor, self.step, self.signals
            step_hooks, last = run.has_step_hooks, len(plan) - 1
            for k in range(state.step_in_epoch, len(plan)):
                batches = [(sources[i], next_batch(i)) for i in plan[k]]
                if lr_factor is not None:
                    self.stepper.set_lr_factor(lr_factor(state.global_step, epoch))
                records, stepped = step(batches, state.global_step, k == last)
                state.add_losses(records)
                if stepped:
                    state.global_step += 1
                    if step_hooks:
                        run.step_end()
                    if state.stop_reason is not None:
                        break
                    if signum := signals.agreed():  # SIGINT/SIGTERM: all ranks stop here
                        self.interrupt(signum)
            else:
                sums = self.comm.gather_sums(loss_sums(state.epoch_losses))
                self.balancer.on_epoch_end(epoch, task_means(sums))
                state.end_epoch(self.scheduler.state_dict())
                run.epoch_end()
        run.fit_end()

    def _start_epoch(self, epoch: int, plan: list[Step], scheduler_state: dict[str, Any]) -> None:
        """Enter ``epoch``: the training loaders start over (streams continue), or, for the
        interrupted epoch of a resumed run, continue where the checkpoint left them."""
        state = self.state
        self.loaders.start_epoch(epoch)
        self.draws = draw_counts(plan, [dl.dataset.name for dl in self.train])
        if self.resuming and epoch == state.epoch:  # the interrupted epoch: continue it
            self.resuming = False
            state.plan, state.scheduler_state = plan, scheduler_state
            self.loaders.resume(state.loader_positions(), self._recorded_positions)
            return
        state.start_epoch(epoch, plan, scheduler_state)

    def interrupt(self, signum: int) -> None:
        """Stop after the step just taken: write ``last.pt`` (with a run directory), then raise.

        Raises:
            TrainingInterrupted: Always.
        """
        path = None
        if self.checkpointer is not None:
            self.save("last")  # a collective under DDP: every rank agreed to stop here
            path = self.checkpointer.directory / ckpt.LAST
        raise TrainingInterrupted(signum, self.state.global_step, path)

    # ------------------------------------------------------------------ what hooks call

    def train_record(self, window: Records) -> dict[str, float]:
        """Training losses of ``window`` (averaged over ranks), learning rates, balancer weights."""
        record = train_losses(self.comm.gather_sums(loss_sums(window)))
        groups = self.stepper.full_groups
        record[make_key("model", "all", "train", "lr")] = float(groups[0]["lr"])
        for group in groups[1:]:
            if "name" in group:  # a param_groups pattern
                record[make_key("model", "all", "train", f"lr/{group['name']}")] = float(
                    group["lr"]
                )
        for task_name, w in sorted(self.balancer.weights().items()):
            record[make_key("model", "all", "train", f"weight/{task_name}")] = float(w)
        record.update(self.draws)
        return record

    def score(self) -> dict[str, float]:
        """``model.score(evals)``; under DDP each rank predicts its shard of whole batches and
        the gathered predictions are scored, equal to a single-process evaluation."""
        slices = self.cfg.slices  # registered slice functions, scored at evaluation
        if not self.env.enabled:
            return self.model.score(self.evals, slices=slices)
        scores: dict[str, float] = {}
        for loader in self.evals:
            ds, shard = loader.dataset, self.eval_shards.get(id(loader))
            if shard is None:  # a stream: every rank reads all of it, as one process would
                preds = self.model.predict(loader, return_preds=True, slices=slices)
            else:
                local = self.model.predict(shard, return_preds=True, slices=slices)
                indices = shard.sampler.indices  # type: ignore[attr-defined]
                preds = gather_predictions(local, indices, len(ds))
            self.model.score_predictions(preds, ds.name, ds.split, into=scores)
        return scores

    def save(self, which: str) -> None:
        """Write ``last.pt`` or ``best.pt`` on rank 0; every rank waits until it is complete."""
        checkpointer = self.checkpointer
        assert checkpointer is not None  # the checkpoint hook exists only with one
        rank_records: list[Any] = []
        if self.comm.enabled:  # each rank resumes with its own loss records
            mine = (cpu_records(self.state.window), cpu_records(self.state.epoch_losses))
            rank_records = self.comm.gather_objects(mine)
        self.state.streams = self.comm.gather_objects(self.loaders.cursor_states())
        if checkpointer.write:
            checkpointer.save(which, self.checkpoint(rank_records))
        self.comm.barrier()

    def checkpoint(self, rank_records: Sequence[tuple[Records, Records]] = ()) -> dict[str, Any]:
        """The run's checkpoint: every stateful piece's state dict (see :mod:`.checkpoint`)."""
        return {
            **model_entries(self.model),  # format, version, task_names, model
            "optimizer": self.stepper.optimizer.state_dict(),
            "lr_scheduler": {
                "spec": plain_config(self.cfg.lr_scheduler),
                "warmup_steps": self.cfg.warmup_steps,
                "base_lrs": [float(lr) for lr in self.stepper.base_lrs],
            },
            "balancer": self.balancer.state_dict(),
            "run": self.state.state_dict(rank_records),
            "hooks": self.run_view.hook_states(),
            "rng": ckpt.get_rng_state(),
            "config": self._plain_config(),
        }

    # ------------------------------------------------------------------ set-up

    def _lr_schedule(self) -> Callable[[int, int], float] | None:
        """The LR factor over the run's horizon: the scheduler tells each epoch's length."""
        cfg = self.cfg
        warmup = cfg.warmup_steps or cfg.warmup_epochs or cfg.warmup_fraction
        if is_constant(cfg.lr_scheduler, warmup):
            return None  # no factor: no need to plan every epoch for the horizon
        lengths = self.scheduler.epoch_lengths(self.state.batch_counts, cfg.n_epochs)
        n = cfg.grad_accumulation_steps
        steps = [-(-m // n) for m in lengths]  # optimizer steps: N batches each
        warmup_steps = resolve_warmup(
            cfg.warmup_steps, cfg.warmup_epochs, cfg.warmup_fraction, steps
        )  # warm-up in steps, in epochs or as a fraction
        return lr_factor_fn(cfg.lr_scheduler, warmup_steps, sum(steps))

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """Load a checkpoint into the run's pieces (the global random states come last)."""
        ckpt.check_resume(saved, self.state.batch_counts, self.env.world_size)
        saved_cfg = (saved.get("config") or {}).get("trainer") or {}
        conflicts = resume_conflicts(saved_cfg, self.cfg)
        if conflicts:
            raise ConfigError(conflicts, header="cannot resume with settings the run cannot take:")
        with ckpt.all_or_nothing(self.model, "cannot resume: the checkpoint"):
            hint = "use a checkpoint of this config's model"
            load_model_state(self.model, saved, "cannot resume: the checkpoint", hint=hint)
            self.balancer.load_state_dict(saved["balancer"])
            self.scheduler.load_state_dict(saved["run"]["scheduler"])
            keep = optimizer_settings_changed(saved_cfg, self.cfg)  # the config's values win
            self.stepper.load_state_dict(saved["optimizer"], keep_settings=keep)
        self.state.load_state_dict(saved["run"], self.env.rank)
        self._recorded_positions = list(saved["run"]["progress"]["loader_positions"])
        streams = self.state.streams
        self.loaders.load_cursor_states(
            streams[self.env.rank] if streams else [None] * len(self.train)
        )
        self.run_view.load_hook_states(saved["hooks"])
        state = self.state
        if state.stop_reason is not None:
            logger.warning(
                "the checkpoint's run was stopped (%s): nothing to train", state.stop_reason
            )
        elif state.epoch >= self.cfg.n_epochs:
            logger.warning(
                "the checkpoint's run is finished (%d of %d epochs): nothing to train; raise "
                "n_epochs to train longer",
                state.epoch,
                self.cfg.n_epochs,
            )
        else:
            at = (state.epoch + 1, state.step_in_epoch, state.global_step)
            logger.info("resuming at epoch %d, step %d of the epoch (global step %d)", *at)

    @staticmethod
    def _saved_step(saved: Mapping[str, Any] | None) -> int | None:
        """The step of the checkpoint's last history record (``None``: a fresh run); the
        writers drop what was logged after it."""
        if saved is None:
            return None
        history = saved["run"]["history"]
        return int(history[-1]["step"]) if history else -1

    def _hooks(self, guard: NonfiniteGuard, keys: Mapping[str, bool]) -> list[Hook]:
        """The run's hooks in their fixed order (:mod:`.hooks`): the non-finite guard, probes,
        evaluation, the user's hooks, writers, checkpoints, the progress bar."""
        cfg = self.cfg
        hooks: list[Hook] = [guard]
        if self.probes is not None:
            hooks.append(self.probes)
        evaluate_every = Every.of(cfg.evaluation_freq, cfg.evaluation_unit)
        score = self.score if self.evals else None
        hooks.append(
            EvaluationHook(evaluate_every, self.train_record, score, self.env.is_main, cfg.n_epochs)
        )
        if self.meter is not None:
            hooks.append(self.meter)
        hooks += [HOOKS.build(spec, f"hooks[{i}]") for i, spec in enumerate(cfg.hooks)]
        self.writers = None  # rank 0 alone writes logs
        files = [w for w in cfg.writers or [] if isinstance(w, str)]
        needs_dir = files or cfg.checkpoint_every or cfg.checkpoint_metric
        if self.env.is_main and cfg.run_dir is None and needs_dir:
            logger.warning(
                "run_dir is not set: no checkpoints or %s are written",
                ", ".join(files) or "log files",
            )
        if self.env.is_main and (cfg.writers or (cfg.writers is None and cfg.run_dir)):
            at_steps = any(
                overrides(h, "on_step_end") for h in hooks if not isinstance(h, EvaluationHook)
            )
            self.writers = LogWriters(at_steps)
            hooks.append(self.writers)
        self.checkpointer = None
        if cfg.run_dir is not None:
            metric = cfg.checkpoint_metric
            mode = None if metric is None else ckpt.metric_mode(metric, cfg.checkpoint_mode, keys)
            directory = Path(cfg.run_dir) / ckpt.CHECKPOINT_DIR
            self.checkpointer = ckpt.Checkpointer(directory, metric, mode, write=self.env.is_main)
            every = Every.of(cfg.checkpoint_every, cfg.checkpoint_unit)
            hooks.append(CheckpointHook(every, self.checkpointer, self.save))
        self.progress: ProgressBar | None = None
        if cfg.progress_bar and self.env.is_main:
            self.progress = ProgressBar(self.stepper.full_groups, cfg.n_epochs, self.meter)
            hooks.append(self.progress)
        return hooks

    def _probes(self, saved: Mapping[str, Any] | None) -> ProbeHook | None:
        """The interference probes (``None`` when off, and on DDP ranks other than 0)."""
        cfg = self.cfg
        if not self.env.is_main:
            return None
        if saved is None and cfg.run_dir is not None:
            remove_report(cfg.run_dir)
        if cfg.diagnostics is None:
            return None
        monitor = InterferenceMonitor(cfg.diagnostics, cfg.seed)
        return ProbeHook(monitor, cfg.run_dir, self.train)

    def _open_writers(self, resume_step: int | None) -> list[Writer]:
        """The writers of the ``writers`` hook."""
        cfg = self.cfg
        if cfg.run_dir is None:  # files need a run directory (a warning said so)
            return open_writers([w for w in cfg.writers or [] if not isinstance(w, str)], None)
        plain = self._plain_config()
        ctx = WriterContext(
            Path(cfg.run_dir), resume_step, flatten(plain["experiment"] or plain["trainer"])
        )
        return open_writers(cfg.writers, ctx)

    def _plain_config(self) -> dict[str, Any]:
        return {
            "trainer": plain_config(self.cfg),
            "experiment": plain_config(self.trainer.experiment_config),
        }
