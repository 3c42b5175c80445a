"""The training loop's one extension point, :class:`Hook`, the :class:`Run` hooks see, and the
built-in hooks.

Events, their firing order (``nonfinite``, ``diagnostics``, ``evaluation``, the user's hooks,
``writers``, ``checkpoint``, ``progress``) and hook state in checkpoints: ``docs/training.md``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from mtlgraph._suggest import quoted
from mtlgraph.balancing import Balancer
from mtlgraph.balancing.weighting import SumBalancer
from mtlgraph.data.collate import MASK_SUFFIX, Batch
from mtlgraph.diagnostics import DiagnosticsReport, InterferenceMonitor, write_report
from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.task import Task
from mtlgraph.metrics import make_key, split_key
from mtlgraph.registry import Registry
from mtlgraph.training.checkpoint import Checkpointer
from mtlgraph.training.state import TRAIN_LOSS, Records, RunState
from mtlgraph.training.writers import Writer

logger = logging.getLogger(__name__)

Unit = Literal["step", "epoch"]
EVENTS = ("on_fit_start", "on_step_end", "on_evaluate_end", "on_epoch_end", "on_fit_end")


@dataclass(frozen=True)
class Every:
    """A hook's :attr:`Hook.every`: its ``on_<unit>_end`` every ``n`` units, not the other event.

    Example:
        >>> from mtlgraph.training.hooks import Every
        >>> Every.of(2, "epochs")
        Every(n=2, unit='epoch')
    """

    n: int
    unit: Unit

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ConfigError(f"Every: n must be an integer >= 0, got {self.n!r}")
        if self.unit not in ("step", "epoch"):
            raise ConfigError(f"Every: unit must be 'step' or 'epoch', got {self.unit!r}")

    @classmethod
    def of(cls, n: int, config_unit: str) -> Every:
        """From a config's ``(every, "steps" | "epochs")`` pair."""
        return cls(n, "epoch" if config_unit in ("epoch", "epochs") else "step")


class Hook:
    """A side concern of the training loop: override the events you need (all are no-ops).

    Attributes:
        name: The hook's key in checkpoints (``""``: its class name, made unique).
        every: ``None`` (every step and epoch) or an :class:`Every`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import (DictDataLoader, DictDataset, Hook, MultitaskClassifier,
        ...                       Operation, Task, Trainer)
        >>> class CountSteps(Hook):
        ...     def __init__(self):
        ...         self.steps = 0
        ...     def on_step_end(self, run):
        ...         self.steps += 1
        ...         if run.global_step == 6:
        ...             run.stop("six steps are enough")
        ...     def state_dict(self):
        ...         return {"steps": self.steps}
        ...     def load_state_dict(self, state):
        ...         self.steps = state["steps"]
        >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
        >>> task = Task("t", {"m": nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
        >>> loader = DictDataLoader(DictDataset("d", "train", {"x": x}, {"t": y}), batch_size=16)
        >>> counter = CountSteps()
        >>> trainer = Trainer(n_epochs=5, progress_bar=False, hooks=[counter])
        >>> trainer.fit(MultitaskClassifier([task]), [loader])
        >>> counter.steps, trainer.global_step
        (6, 6)
    """

    name: str = ""
    every: Every | None = None

    def on_fit_start(self, run: Run) -> None:
        """Once, when the run's pieces are built (after a resume restored them)."""

    def on_step_end(self, run: Run) -> None:
        """After an optimizer step (``run.global_step`` counts it)."""

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        """After an evaluation; ``scores`` is its record (``run.history[-1]``)."""

    def on_epoch_end(self, run: Run) -> None:
        """After an epoch (``run.epoch`` is the epoch just finished, 1-based)."""

    def on_fit_end(self, run: Run) -> None:
        """Once, when training is over (finished or stopped)."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's state, saved in checkpoints (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values on resume."""


def overrides(hook: Hook, event: str) -> bool:
    """Whether ``hook`` does something on ``event`` (its class overrides the method)."""
    return getattr(type(hook), event) is not getattr(Hook, event)


def hook_names(hooks: Sequence[Hook]) -> list[str]:
    """Each hook's checkpoint key: its :attr:`Hook.name` or class name, made unique."""
    names: list[str] = []
    for hook in hooks:
        base = hook.name or type(hook).__name__
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


class Run:
    """What hooks see of a training run, and the dispatch of their events.

    Args:
        state: The :class:`~mtlgraph.training.state.RunState`.
        model: The model being trained.
        optimizer: The torch optimizer.
        balancer: The balancer.
        hooks: Every hook of the run, built-in and user, in firing order.
        metric_keys: Followable record keys, each with ``higher_is_better``.

    Attributes:
        model, optimizer, balancer, hooks, metric_keys: As given.
    """

    def __init__(
        self,
        state: RunState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        balancer: Balancer,
        hooks: Sequence[Hook],
        metric_keys: Mapping[str, bool] | None = None,
    ) -> None:
        self.state, self.model, self.optimizer, self.balancer = state, model, optimizer, balancer
        self.hooks, self.names = list(hooks), hook_names(hooks)
        self.metric_keys: Mapping[str, bool] = metric_keys or {}
        self._record: dict[str, float] | None = None  # the evaluation record being built
        self._by_event = {e: [h for h in self.hooks if overrides(h, e)] for e in EVENTS}
        wrong = [
            f"hook '{name}': every is {hook.every!r}, but it is the hook's trigger: None (every "
            "step and epoch) or mtlgraph.training.Every(n, 'step' | 'epoch'); give your own "
            "attribute another name"
            for name, hook in zip(self.names, self.hooks, strict=True)
            if hook.every is not None and not isinstance(hook.every, Every)
        ]
        if wrong:
            raise ConfigError("; ".join(wrong))
        self._steps = self._gated("on_step_end", "step")
        self._epochs = self._gated("on_epoch_end", "epoch")
        self.has_step_hooks = bool(self._steps)  # the loop skips step_end without any

    def _gated(self, event: str, unit: Unit) -> list[tuple[Hook, int]]:
        """``(hook, n)``: the hooks with ``event``, each fired every ``n`` units."""
        out = []
        for hook in self._by_event[event]:
            every = hook.every
            if every is None:
                out.append((hook, 1))
            elif every.unit == unit and every.n > 0:
                out.append((hook, every.n))
        return out

    # ------------------------------------------------------------ what hooks read and call

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return self.state.global_step

    @property
    def epoch(self) -> int:
        """The 1-based epoch in progress, or just finished (as in history records)."""
        return self.state.epoch_number

    @property
    def history(self) -> list[dict[str, float]]:
        """The records logged so far (``Trainer.history``)."""
        return self.state.history

    @property
    def stop_reason(self) -> str | None:
        """Why :meth:`stop` was called (``None``: it was not)."""
        return self.state.stop_reason

    def log(self, values: Mapping[str, float]) -> None:
        """Log ``values`` into the history (and so the writers): into the evaluation record
        being built, or as a record of their own with ``epoch`` and ``step``."""
        floats = {k: float(v) for k, v in values.items()}
        if self._record is not None:
            self._record.update(floats)
            return
        record = {"epoch": float(self.epoch), "step": float(self.global_step), **floats}
        self.state.history.append(record)

    def stop(self, reason: str) -> None:
        """End the run cleanly after the current event; the first reason given is kept."""
        if self.state.stop_reason is None:
            self.state.stop_reason = str(reason)
            logger.info("stopping at step %d: %s", self.global_step, reason)

    # ------------------------------------------------------------ what the loop calls

    def evaluated(self, record: dict[str, float]) -> None:
        """An evaluation's record: into the history, then through every ``on_evaluate_end``."""
        self.state.history.append(record)
        self._record = record
        try:
            for hook in self._by_event["on_evaluate_end"]:
                hook.on_evaluate_end(self, record)
        finally:
            self._record = None

    def fit_start(self) -> None:
        for hook in self._by_event["on_fit_start"]:
            hook.on_fit_start(self)

    def step_end(self) -> None:
        step = self.state.global_step
        for hook, n in self._steps:
            if step % n == 0:
                hook.on_step_end(self)

    def epoch_end(self) -> None:
        done = self.state.epoch
        for hook, n in self._epochs:
            if done % n == 0:
                hook.on_epoch_end(self)

    def fit_end(self) -> None:
        for hook in self._by_event["on_fit_end"]:
            hook.on_fit_end(self)

    def hook_states(self) -> dict[str, dict[str, Any]]:
        """``{name: hook.state_dict()}`` of every hook (a checkpoint's ``hooks`` entry)."""
        return {name: hook.state_dict() for name, hook in zip(self.names, self.hooks, strict=True)}

    def load_hook_states(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Give each hook its saved state; a hook the saved run did not have starts afresh."""
        for name, hook in zip(self.names, self.hooks, strict=True):
            if name in states:
                hook.load_state_dict(states[name])
            elif hook.state_dict():  # a hook without state loses nothing
                logger.warning(
                    "the checkpoint holds no state of hook '%s' (the saved run had hooks %s): "
                    "it starts afresh",
                    name,
                    quoted(states),
                )


# ---------------------------------------------------------------- user hooks from specs


HOOKS: Registry[Callable[..., Hook]] = Registry("hook", base=Hook)
"""Hooks by name, for ``Trainer(hooks=[...])`` and ``trainer.hooks`` in YAML."""


# ---------------------------------------------------------------- built-in hooks


class ProbeHook(Hook):
    """Interference probes (rank 0 only; they leave training untouched), each logged as a
    record of its own, and the report at the end (:attr:`report`)."""

    name = "diagnostics"

    def __init__(
        self,
        monitor: InterferenceMonitor,
        run_dir: str | None,
        train: Sequence[Any],
    ) -> None:
        self.monitor, self.run_dir, self.train = monitor, run_dir, train
        self.every = Every(monitor.every, "step")
        self.report: DiagnosticsReport | None = None

    def on_step_end(self, run: Run) -> None:
        # the lookahead simulates the step the run's optimizer would take, from its state now
        run.log(self.monitor.probe(run.model, self.train, run.optimizer, run.global_step))  # type: ignore[arg-type]

    def on_fit_end(self, run: Run) -> None:
        """The report: kept, logged, and written to the run directory."""
        report = self.report = self.monitor.report()
        logger.info("%s", report.to_text())
        if self.run_dir is not None:
            write_report(report, self.run_dir)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.monitor.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.monitor.load_state_dict(state)


class EvaluationHook(Hook):
    """An evaluation record (training losses, learning rates, balancer weights, scores) when due
    and at the end; the balancer sees the scores, then every hook's ``on_evaluate_end``.

    Args:
        every: When to evaluate.
        train_record: The training part of a record, from the loss window.
        score: The evaluation scores (``None``: no evaluation loaders).
        is_main: Whether this process logs at INFO level (rank 0).
        n_epochs: The run's epochs (none: no evaluation at the end).
    """

    name = "evaluation"

    def __init__(
        self,
        every: Every,
        train_record: Callable[[Records], dict[str, float]],
        score: Callable[[], dict[str, float]] | None,
        is_main: bool,
        n_epochs: int,
    ) -> None:
        self.every, self.train_record, self.score = every, train_record, score
        self.is_main, self.n_epochs = is_main, n_epochs
        self.warned_scales = False  # the one-time loss-scale warning

    def on_step_end(self, run: Run) -> None:
        self.evaluate(run)

    def on_epoch_end(self, run: Run) -> None:
        self.evaluate(run)

    def state_dict(self) -> dict[str, Any]:
        return {"warned_scales": self.warned_scales}  # once per run, resumes included

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warned_scales = bool(state.get("warned_scales", False))

    def on_fit_end(self, run: Run) -> None:
        """Evaluate the final model unless its last step was just evaluated."""
        if run.state.last_logged != run.global_step and self.n_epochs > 0:
            self.evaluate(run)

    def evaluate(self, run: Run) -> None:
        """Build the record and hand it to the run."""
        state = run.state
        record = {"epoch": float(state.epoch_number), "step": float(state.global_step)}
        record.update(self.train_record(state.take_window()))
        if not self.warned_scales and self.is_main and type(run.balancer) is SumBalancer:
            tasks: Mapping[str, Task] = getattr(run.model, "tasks", {})
            regression = [t for t, task in tasks.items() if task.task_type == "regression"]
            weights = {t: float(task.weight) for t, task in tasks.items()}
            self.warned_scales = warn_loss_scales(record, regression, weights) is not None
        if self.score is not None:
            scores = self.score()
            record.update(scores)
            run.balancer.on_evaluation(scores)
        state.last_logged = state.global_step
        level = logging.INFO if self.is_main else logging.DEBUG
        if logger.isEnabledFor(level):  # the summary is built only when it is shown
            logger.log(
                level,
                "epoch %d step %d: %s",
                state.epoch_number,
                state.global_step,
                ", ".join(f"{k}={v:.4g}" for k, v in record.items() if _summary_key(k)),
            )
        run.evaluated(record)


class LogWriters(Hook):
    """The ``writers`` hook: each new history record goes to every writer at the next event.

    Args:
        at_steps: Write after every step too (otherwise only at evaluations and epoch ends).

    Attributes:
        writers: The writers (opened once a resumed run is restored).

    Example:
        >>> from mtlgraph.training.hooks import LogWriters
        >>> from mtlgraph.training.writers import Writer
        >>> class Show(Writer):
        ...     def write(self, record):
        ...         print(record)
        >>> hook = LogWriters(at_steps=False)
        >>> hook.writers = [Show()]
        >>> history = [{"step": 1.0}, {"step": 2.0}]
        >>> hook.write(history)
        {'step': 1.0}
        {'step': 2.0}
        >>> history.append({"step": 3.0})
        >>> hook.write(history)  # only what was added since
        {'step': 3.0}
    """

    name = "writers"

    def __init__(self, at_steps: bool) -> None:
        self.writers: list[Writer] = []
        self.written = 0  # history records already written
        if not at_steps:
            self.every = Every(1, "epoch")

    def on_fit_start(self, run: Run) -> None:
        self.written = len(run.history)  # a resumed run's records were written before

    def on_step_end(self, run: Run) -> None:
        self.write(run.history)

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        self.write(run.history)

    def on_epoch_end(self, run: Run) -> None:
        self.write(run.history)

    def on_fit_end(self, run: Run) -> None:
        self.write(run.history)

    def write(self, history: Sequence[Mapping[str, float]]) -> None:
        """Write the records added to ``history`` since the last call."""
        for record in history[self.written :]:
            for writer in self.writers:
                writer.write(record)
        self.written = len(history)

    def close(
        self, history: Sequence[Mapping[str, float]], final: Mapping[str, float] | None
    ) -> None:
        """Write what is left, then close every writer (``final``: the last record, on success)."""
        try:
            self.write(history)
        finally:
            for writer in self.writers:
                writer.close(final)


class CheckpointHook(Hook):
    """``best.pt`` when an evaluation improved ``checkpoint_metric``; ``last.pt`` when
    :attr:`every` is due and at the end. Its state is the best-by-metric bookkeeping.

    Args:
        every: When ``last.pt`` is written.
        checkpointer: Tracks the best value.
        save: Writes ``"last"`` or ``"best"`` (the whole run's checkpoint).
    """

    name = "checkpoint"

    def __init__(self, every: Every, checkpointer: Checkpointer, save: Callable[[str], None]):
        self.every, self.checkpointer, self.save = every, checkpointer, save

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        if self.checkpointer.improved(scores):
            self.save("best")

    def on_step_end(self, run: Run) -> None:
        self.save("last")

    def on_epoch_end(self, run: Run) -> None:
        self.save("last")

    def on_fit_end(self, run: Run) -> None:
        self.save("last")

    def state_dict(self) -> dict[str, Any]:
        return self.checkpointer.best_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.checkpointer.load_best_state(state)


class Throughput(Hook):
    """Training throughput and memory: examples/s, tokens/s (the real tokens of padded text
    fields: their ``<field>_mask``), peak RSS and, on CUDA, peak allocated memory. The step
    counts each micro-step's batches (:meth:`count`, :meth:`done`); the rates cover the time
    from a window's first step to its last, so evaluations are not in them.

    Args:
        device: The model's device.
        log: Log ``model/all/train/{examples_per_s, tokens_per_s, peak_rss_mb,
            cuda_max_memory_mb}`` into each evaluation record (``TrainerConfig.throughput``).

    Example:
        >>> import torch
        >>> from mtlgraph.training.hooks import Throughput
        >>> meter = Throughput(torch.device("cpu"), log=True)
        >>> X = {"text": torch.ones(4, 6), "text_mask": torch.tensor([[1] * 3 + [0] * 3] * 4)}
        >>> meter.count([(None, (X, {}))]); meter.done()
        >>> meter.examples, meter.tokens
        (4, 12)
    """

    name = "throughput"

    def __init__(self, device: torch.device, log: bool) -> None:
        self.device, self.log = device, log
        self.examples = self.tokens = 0  # since the window's first step
        self.start: float | None = None  # the window's first step began
        self.end = 0.0  # its last step ended
        self.totals: list[float] = [0, 0, 0.0]  # examples, tokens, seconds of closed windows

    def count(self, batches: Sequence[tuple[Any, Batch]]) -> None:
        """Count a micro-step's examples and tokens (before its forward pass)."""
        if self.start is None:
            self.start = time.perf_counter()
        for _, (X, _) in batches:
            self.examples += len(next(iter(X.values())))
            for field, value in X.items():
                if field.endswith(MASK_SUFFIX) and field[: -len(MASK_SUFFIX)] in X:
                    self.tokens += int(torch.count_nonzero(value))

    def done(self) -> None:
        """A micro-step ended."""
        self.end = time.perf_counter()

    def rates(self, close: bool = False) -> dict[str, float]:
        """``examples_per_s``, ``tokens_per_s`` (when a batch had text) and memory in MB, over
        the window (``close``: then start a new one) or, without ``close``, the whole fit."""
        seconds = self.end - self.start if self.start is not None else 0.0
        examples: float = self.examples
        tokens: float = self.tokens
        if close:
            self.totals = [
                self.totals[0] + examples,
                self.totals[1] + tokens,
                self.totals[2] + seconds,
            ]
            self.examples = self.tokens = 0
            self.start = None
        else:
            examples, tokens = examples + self.totals[0], tokens + self.totals[1]
            seconds += self.totals[2]
        out: dict[str, float] = {}
        if seconds > 0:
            out["examples_per_s"] = examples / seconds
            if tokens:
                out["tokens_per_s"] = tokens / seconds
        return {**out, **peak_memory(self.device)}

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        values = self.rates(close=True)
        if self.log:
            run.log({make_key("model", "all", "train", k): v for k, v in values.items()})

    def on_fit_end(self, run: Run) -> None:
        values = self.rates()
        if "examples_per_s" in values:
            logger.info(
                "training throughput: %s",
                ", ".join(f"{k}={v:.4g}" for k, v in values.items()),
            )


def throughput_meter(cfg: Any, device: torch.device, is_main: bool) -> Throughput | None:
    """The run's :class:`Throughput` when its numbers are shown: logged (``cfg.throughput``) or
    on the progress bar (``cfg.progress_bar`` on rank 0, on a terminal); else ``None``, and the
    step counts nothing."""
    bar = cfg.progress_bar and is_main and bool(getattr(sys.stderr, "isatty", bool)())
    if not (cfg.throughput or bar):
        return None
    return Throughput(device, log=cfg.throughput)


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory (``peak_rss_mb``) and, on CUDA, the peak memory
    allocated by torch on ``device`` (``cuda_max_memory_mb``), in MB."""
    out: dict[str, float] = {}
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        pass
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    if device.type == "cuda":
        out["cuda_max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class ProgressBar(Hook):
    """One tqdm bar per epoch; every 20 steps it shows the latest loss and learning rate, and
    with a ``meter`` the fit's examples/s, tokens/s and peak memory.

    Args:
        groups: The optimizer's parameter groups (the first one's ``lr`` is shown).
        n_epochs: The run's epochs.
        meter: The run's :class:`Throughput` (``None``: none shown).
    """

    name = "progress"

    def __init__(
        self, groups: Sequence[Mapping[str, Any]], n_epochs: int, meter: Throughput | None = None
    ) -> None:
        self.groups, self.n_epochs, self.meter = groups, n_epochs, meter
        self.bar: tqdm[None] | None = None

    def on_step_end(self, run: Run) -> None:
        state = run.state
        if self.bar is None:
            self.bar = tqdm(
                total=len(state.plan),
                desc=f"epoch {state.epoch + 1}/{self.n_epochs}",
                leave=False,
                disable=None,
            )
        self.bar.update(state.step_in_epoch - self.bar.n)
        if state.global_step % 20 == 0 and state.window:
            shown = {
                "loss": f"{float(state.window[-1].loss):.4f}",
                "lr": f"{self.groups[0]['lr']:.3g}",
            }
            if self.meter is not None:
                shown.update(_bar_rates(self.meter.rates()))
            self.bar.set_postfix(shown, refresh=False)

    def on_epoch_end(self, run: Run) -> None:
        self.close()

    def on_fit_end(self, run: Run) -> None:
        self.close()

    def close(self) -> None:
        """Close the epoch's bar (``fit`` calls it when a run stops early: a signal, an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _bar_rates(values: Mapping[str, float]) -> dict[str, str]:
    """The throughput as the progress bar shows it: ``ex/s``, ``tok/s``, ``rss``, ``cuda``."""
    names = {
        "examples_per_s": ("ex/s", "{:.0f}"),
        "tokens_per_s": ("tok/s", "{:.0f}"),
        "peak_rss_mb": ("rss", "{:.0f}MB"),
        "cuda_max_memory_mb": ("cuda", "{:.0f}MB"),
    }
    return {names[k][0]: names[k][1].format(v) for k, v in values.items() if k in names}


LOSS_RATIO = 100.0
"""Task training losses further apart than this at the first evaluation get a warning."""


def warn_loss_scales(
    record: Mapping[str, float],
    regression: Collection[str],
    weights: Mapping[str, float] | None = None,
) -> str | None:
    """Warn (and return the message) when the tasks' *weighted* training losses in ``record``
    (each task's loss times its ``weights`` entry, 1 when absent: what the ``sum`` balancer
    adds up) differ by more than :data:`LOSS_RATIO` and the largest or the smallest is a
    ``regression`` task's: the small task barely trains. Losses of classification tasks share a
    scale (nats per label), so a gap between two of them means one is nearly solved: no warning.

    Example:
        >>> record = {"cls/d/train/loss": 0.7, "reg/d/train/loss": 0.001}
        >>> print(warn_loss_scales(record, regression=["reg"]))
        ... # doctest: +ELLIPSIS
        the task losses differ by 700x once weighted by the task weights (task 'cls': 0.7 = ...
        >>> warn_loss_scales(record, ["reg"], weights={"reg": 100.0}) is None  # weighted: 0.1
        True
    """
    weights = weights or {}
    per_task: dict[str, list[float]] = {}
    for key, value in record.items():
        try:
            task, _, split, metric = split_key(key)
        except ValueError:
            continue
        if split == "train" and metric == "loss" and task != "model" and math.isfinite(value):
            per_task.setdefault(task, []).append(float(value))
    raw = {t: sum(v) / len(v) for t, v in per_task.items()}
    means = {t: weights.get(t, 1.0) * m for t, m in raw.items()}
    if len(means) < 2:
        return None
    big, small = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
    if means[small] <= 0 or means[big] / means[small] <= LOSS_RATIO:
        return None
    if big not in regression and small not in regression:
        return None

    def term(t: str) -> str:
        return f"task '{t}': {means[t]:.4g} = {weights.get(t, 1.0):g} x {raw[t]:.4g}"

    message = (
        f"the task losses differ by {means[big] / means[small]:.0f}x once weighted by the "
        f"task weights ({term(big)}, {term(small)}; weight x loss): with "
        f"the 'sum' balancer '{small}' barely trains. Raise its weight (Task(weight=...), "
        f"tasks.{small}.weight) to about {weights.get(small, 1.0) * means[big] / means[small]:.3g},"
        " standardise its regression targets, or use a balancer that learns the scales "
        "(balancer={'name': 'uncertainty', 'lr': 0.1}: its log-variances must travel "
        "|log(loss)|, which the Trainer's lr is often too small for). Said once per run"
    )
    logger.warning("%s", message)
    return message


def _summary_key(key: str) -> bool:
    """Whether the log line shows ``key``: the training loss and evaluation scores."""
    if key == TRAIN_LOSS:
        return True
    try:
        _, _, split, metric = split_key(key)
    except ValueError:  # "epoch", "step"
        return False
    return split != "train" and "/" not in metric
