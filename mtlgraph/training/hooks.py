"""The training loop's side concerns as hooks, fired in a fixed order by one trigger type.

After every optimizer step and after every epoch, the loop fires the hooks that are due, always
in this order:

1. :class:`ProbeHook` -- an interference probe (``diagnostics.every`` steps);
2. :class:`EvaluateHook` -- a history record: training losses, learning rates, balancer
   weights, evaluation scores; ``best.pt`` when ``checkpoint_metric`` improved
   (``evaluation_freq`` steps or epochs);
3. :class:`SaveHook` -- ``last.pt`` (``checkpoint_every`` steps or epochs);
4. :class:`ProgressBar` -- the bar's loss/lr postfix (every 20 steps).

When the last epoch is over, each hook's :meth:`Hook.finish` runs in the same order: the
diagnostics report, a final evaluation (unless the last step was just evaluated), the final
``last.pt``. When a hook is due is one :class:`Every` each: an integer comparison per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from mtlgraph.balancing.weighting import SumBalancer
from mtlgraph.diagnostics import InterferenceMonitor, write_report
from mtlgraph.metrics import split_key
from mtlgraph.training.checkpoint import Checkpointer
from mtlgraph.training.state import TRAIN_LOSS, LossRecord

if TYPE_CHECKING:
    from mtlgraph.training.trainer import FitLoop

logger = logging.getLogger(__name__)

Unit = Literal["step", "epoch"]


@dataclass(frozen=True)
class Every:
    """Fire every ``n`` optimizer steps or epochs (``n = 0``: never during the run).

    Example:
        >>> from mtlgraph.training.hooks import Every
        >>> every = Every(3, "step")
        >>> [s for s in range(1, 10) if every.due("step", s)]
        [3, 6, 9]
        >>> Every.of(2, "epochs")
        Every(n=2, unit='epoch')
    """

    n: int
    unit: Unit

    @classmethod
    def of(cls, n: int, config_unit: str) -> Every:
        """From a config's ``(every, "steps" | "epochs")`` pair."""
        return cls(n, "epoch" if config_unit in ("epoch", "epochs") else "step")

    def due(self, unit: Unit, count: int) -> bool:
        """Whether the hook fires when ``count`` units of kind ``unit`` are done (1-based)."""
        return self.n > 0 and unit == self.unit and count % self.n == 0


class Hook:
    """A side concern of the loop: :meth:`fire` when :attr:`every` is due, :meth:`finish` once
    after the last epoch."""

    every: Every = Every(0, "step")

    def fire(self, loop: FitLoop) -> None:
        """Run at a step or epoch end where :attr:`every` is due."""

    def finish(self, loop: FitLoop) -> None:
        """Run once when the last epoch is over."""


class ProbeHook(Hook):
    """Interference probes (rank 0 only; they leave training untouched) and the final report."""

    def __init__(self, monitor: InterferenceMonitor, run_dir: str | None) -> None:
        self.monitor, self.run_dir = monitor, run_dir
        self.every = Every(monitor.every, "step")

    def fire(self, loop: FitLoop) -> None:
        """One probe; its values are a history record of their own, sent to the writers."""
        state = loop.state
        values = self.monitor.probe(
            loop.model, loop.train, loop.stepper.full_groups, state.global_step
        )
        loop.publish(
            {"epoch": float(state.epoch_number), "step": float(state.global_step), **values}
        )

    def finish(self, loop: FitLoop) -> None:
        """``trainer.diagnostics``, logged, and written to the run directory."""
        report = loop.trainer.diagnostics = self.monitor.report()
        logger.info("%s", report.to_text())
        if self.run_dir is not None:
            write_report(report, self.run_dir)


class EvaluateHook(Hook):
    """A history record: training losses since the last one, learning rates, balancer weights
    and evaluation scores; the balancer sees the scores, ``best.pt`` follows the metric."""

    def __init__(self, every: Every, checkpointer: Checkpointer | None) -> None:
        self.every, self.checkpointer = every, checkpointer
        self.warned_scales = False  # the one-time loss-scale warning

    def fire(self, loop: FitLoop) -> None:
        """Build and publish the record."""
        state = loop.state
        record = {"epoch": float(state.epoch_number), "step": float(state.global_step)}
        record.update(loop.train_record(state.take_window()))
        if not self.warned_scales and loop.env.is_main and type(loop.balancer) is SumBalancer:
            self.warned_scales = warn_loss_scales(record) is not None
        if loop.evals:
            scores = loop.score()
            record.update(scores)
            loop.balancer.on_evaluation(scores)
        loop.publish(record)
        logger.log(
            logging.INFO if loop.env.is_main else logging.DEBUG,
            "epoch %d step %d: %s",
            state.epoch_number,
            state.global_step,
            ", ".join(f"{k}={v:.4g}" for k, v in record.items() if _summary_key(k)),
        )
        state.last_logged = state.global_step
        if self.checkpointer is not None and self.checkpointer.improved(record):
            loop.save("best")

    def finish(self, loop: FitLoop) -> None:
        """Evaluate the final model unless its last step was just evaluated."""
        if loop.state.last_logged != loop.state.global_step and loop.cfg.n_epochs > 0:
            self.fire(loop)


class SaveHook(Hook):
    """``last.pt`` every N steps or epochs, and once more at the end."""

    def __init__(self, every: Every) -> None:
        self.every = every

    def fire(self, loop: FitLoop) -> None:
        loop.save("last")

    def finish(self, loop: FitLoop) -> None:
        loop.save("last")


class ProgressBar(Hook):
    """One tqdm bar per epoch on rank 0 (hidden off a terminal); it counts batches, and every
    20 optimizer steps shows the latest loss and learning rate."""

    every = Every(20, "step")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm[None] | None = None
        self.loss: torch.Tensor | None = None

    def open(self, epoch: int, n_epochs: int, total: int, initial: int) -> None:
        """Start the bar of ``epoch`` (0-based) at batch ``initial`` of ``total``."""
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch + 1}/{n_epochs}",
            leave=False,
            disable=None if self.enabled else True,
        )

    def advance(self, records: list[LossRecord]) -> None:
        """One batch done."""
        if self.bar is not None:
            self.bar.update()
        if records:
            self.loss = records[0].loss

    def fire(self, loop: FitLoop) -> None:
        if self.enabled and self.bar is not None and self.loss is not None:
            self.bar.set_postfix(
                loss=f"{float(self.loss):.4f}",
                lr=f"{loop.stepper.full_groups[0]['lr']:.3g}",
                refresh=False,
            )

    def close(self) -> None:
        """End the epoch's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


LOSS_RATIO = 100.0
"""Task training losses further apart than this at the first evaluation get a warning."""


def warn_loss_scales(record: Mapping[str, float]) -> str | None:
    """Warn (and return the message) when the tasks' training losses in ``record`` differ by
    more than :data:`LOSS_RATIO`: with a plain sum, the small task barely trains.

    Example:
        >>> print(warn_loss_scales({"cls/d/train/loss": 0.7, "reg/d/train/loss": 0.001}))
        ... # doctest: +ELLIPSIS
        the task losses differ by 700x (task 'cls': 0.7, task 'reg': 0.001): ...
    """
    per_task: dict[str, list[float]] = {}
    for key, value in record.items():
        try:
            task, _, split, metric = split_key(key)
        except ValueError:
            continue
        if split == "train" and metric == "loss" and task != "model" and math.isfinite(value):
            per_task.setdefault(task, []).append(float(value))
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    if len(means) < 2:
        return None
    big, small = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
    if means[small] <= 0 or means[big] / means[small] <= LOSS_RATIO:
        return None
    message = (
        f"the task losses differ by {means[big] / means[small]:.0f}x (task '{big}': "
        f"{means[big]:.4g}, task '{small}': {means[small]:.4g}): with the 'sum' balancer "
        f"'{small}' barely trains. Give it a larger weight (Task(weight=...), tasks.{small}."
        "weight), standardise its regression targets, or use a balancer that learns the scales "
        "(balancer={'name': 'uncertainty', 'lr': 0.1}: its log-variances must travel "
        "|log(loss)|, which the Trainer's lr is often too small for)"
    )
    logger.warning("%s", message)
    return message


def _summary_key(key: str) -> bool:
    """Whether the log line shows ``key``: the training loss and evaluation scores (the writers
    get every key)."""
    if key == TRAIN_LOSS:
        return True
    try:
        _, _, split, metric = split_key(key)
    except ValueError:  # "epoch", "step"
        return False
    return split != "train" and "/" not in metric
