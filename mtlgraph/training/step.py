"""The training step: one batch (or one batch per loader) in, gradients and an optimizer step out.

:class:`TrainStep` is chosen once when ``fit`` starts and is the only step path: mixed precision,
gradient accumulation and DDP fold into it as no-op contexts when they are off (nanoGPT's way),
so the plain step and the accumulating/AMP step are the same code. It owns DDP's ``no_sync`` and
the averaging of learned balancer weights' gradients over ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtlgraph._io import move_to_device
from mtlgraph.balancing import Balancer, GradientBalancer, StepContext
from mtlgraph.data.datasets import Batch
from mtlgraph.exceptions import TrainingError
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.metrics import make_key
from mtlgraph.training.distributed import Collectives
from mtlgraph.training.hooks import Hook, Run, Throughput
from mtlgraph.training.optim import NO_CONTEXT, StepControl, SubsetStepper
from mtlgraph.training.state import LossRecord

logger = logging.getLogger(__name__)

StepOutput = tuple[dict[str, torch.Tensor], dict[str, int], list[LossRecord]]
"""Per-task losses, per-task label counts, and the step's loss records."""


class BatchSource(NamedTuple):
    """A training loader as the step sees it: its dataset's name, and what ``fit`` found out
    about its data once, at the start (:func:`~mtlgraph.training.setup.batch_sources`), so a
    step does not find it out again for every batch."""

    dataset: str  # the dataset's name (loss records and logs)
    all_active: frozenset[str] = frozenset()  # tasks none of whose labels is the ignore value
    on_device: bool = False  # every field and label is a tensor on the model's device


def step_losses(
    model: MultitaskClassifier,
    batches: Sequence[tuple[BatchSource, Batch]],
    device: torch.device,
    keep_empty: bool = False,
    outputs: list[tuple[ExecutionPlan, dict[int, Any]]] | None = None,
) -> StepOutput:
    """Per-task losses and label counts of a step's batches, and a :class:`LossRecord` per
    (batch, task) for logging. A task labelled by two batches of the step gets their
    count-weighted mean loss. ``outputs``, when given, receives each batch's plan and node
    outputs (see ``MultitaskClassifier.calculate_loss``)."""
    losses: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    records = []
    for source, (X, Y) in batches:
        if not source.on_device:
            X, Y = move_to_device(X, device), move_to_device(Y, device)
        batch_losses, batch_counts = model.calculate_loss(
            X, Y, keep_empty=keep_empty, all_active=source.all_active, outputs=outputs
        )
        for task_name, loss in batch_losses.items():
            n = batch_counts[task_name]
            records.append(LossRecord(task_name, source.dataset, loss.detach(), n))
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
        # set by the step before a forward that must keep its outputs (they cannot travel in
        # the return value: DDP replaces the tensors it returns)
        self.outputs: list[tuple[ExecutionPlan, dict[int, Any]]] | None = None

    def forward(
        self, batches: Sequence[tuple[BatchSource, Batch]], device: torch.device
    ) -> StepOutput:
        return step_losses(self.model, batches, device, keep_empty=True, outputs=self.outputs)


class TrainStep:
    """Forward, balancer backward and (every ``grad_accumulation_steps`` micro-steps) the
    optimizer step; the one step path of a run.

    Args:
        model: The model.
        balancer: The run's balancer (set up for the model's tasks).
        stepper: Steps the optimizer on the parameters a step touched.
        control: Autocast, loss scaling and accumulation (no-ops when off).
        device: Where batches go.
        comm: The run's collectives (averages learned balancer weights' gradients over ranks).
        ddp: DDP around :class:`StepLosses` under torchrun, else ``None``.
        guard: The run's non-finite guard (see :class:`NonfiniteGuard`).
        meter: Counts each micro-step's examples and tokens (``None``: nothing counted).
    """

    def __init__(
        self,
        model: MultitaskClassifier,
        balancer: Balancer,
        stepper: SubsetStepper,
        control: StepControl,
        device: torch.device,
        comm: Collectives,
        guard: NonfiniteGuard,
        ddp: DistributedDataParallel | None = None,
        meter: Throughput | None = None,
    ) -> None:
        self.model, self.balancer, self.stepper, self.control = model, balancer, stepper, control
        self.meter = meter
        self.device, self.comm, self.ddp, self.guard = device, comm, ddp, guard
        stepper.guard_norm = guard.mode != "warn"
        # Gradient methods take per-task gradients with autograd.grad, which DDP does not see:
        # they run without DDP's reduction (no_sync) and average their gradients through ctx.reduce.
        self.no_sync = ddp is not None and isinstance(balancer, GradientBalancer)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = (
            comm.mean_ if comm.enabled else _identity
        )
        self.learned = list(balancer.parameters())  # learned balancer weights (often none)
        self.tasks = model.tasks  # the tasks are fixed during a fit
        self.autocast = control.amp is not None
        self.contexts: dict[ExecutionPlan, StepContext] = {}  # the balancer's, per plan
        self.keep_outputs = balancer.needs_outputs
        self.world_size = comm.world_size if comm.enabled else 1

    def __call__(
        self, batches: Sequence[tuple[BatchSource, Batch]], global_step: int, last_of_epoch: bool
    ) -> tuple[list[LossRecord], bool]:
        """One micro-step on ``batches``; returns its loss records and whether the optimizer
        stepped (after ``grad_accumulation_steps`` micro-steps, or the epoch's last one)."""
        control, meter = self.control, self.meter
        if meter is not None:
            meter.count(batches)
        if self.no_sync:
            with self.ddp.no_sync():  # type: ignore[union-attr]
                plan, records = self._forward_backward(batches, global_step)
        else:
            plan, records = self._forward_backward(batches, global_step)
        control.add(plan)
        if meter is not None:
            meter.done()
        if plan is not None and self.comm.enabled:  # learned weights live outside DDP
            for p in self._balancer_params(plan.task_names):
                if p.grad is not None:
                    self.comm.mean_(p.grad)
        if not control.ready(last_of_epoch):
            return records, False
        pending = control.pending
        if len(pending) == 1:
            names: Sequence[str] = pending[0].task_names
        else:
            names = list(dict.fromkeys(t for p in pending for t in p.task_names))
        control.step(self.stepper, self._balancer_params(names) if self.learned else None)
        if self.stepper.nonfinite_norm is not None:  # the update was dropped
            norm, self.stepper.nonfinite_norm = self.stepper.nonfinite_norm, None
            self.guard.bad_norm(norm, names, global_step)
        return records, True

    def _forward_backward(
        self, batches: Sequence[tuple[BatchSource, Batch]], global_step: int
    ) -> tuple[ExecutionPlan | None, list[LossRecord]]:
        """The losses (under autocast with ``amp``), the non-finite check and the balancer's
        backward; the plan that got gradients (``None``: none) and the loss records."""
        outputs: list[tuple[ExecutionPlan, dict[int, Any]]] | None = (
            [] if self.keep_outputs else None
        )
        if self.ddp is not None or self.autocast:
            with self.control.autocast() if self.autocast else NO_CONTEXT:
                if self.ddp is not None:
                    self.ddp.module.outputs = outputs
                    losses, counts, records = self.ddp(batches, self.device)
                    self.ddp.module.outputs = None
                else:
                    losses, counts, records = step_losses(
                        self.model, batches, self.device, outputs=outputs
                    )
        else:
            losses, counts, records = step_losses(self.model, batches, self.device, outputs=outputs)
        if not losses:
            return None, records
        if self.guard.drops(losses, records, global_step):
            return None, []  # skip_batch: no gradients, no logged loss
        plan = self.model.plan(tuple(losses))
        ctx = self.contexts.get(plan)
        if ctx is None:  # one context per plan, its counts and step set for each step
            control = self.control
            ctx = StepContext(
                self.tasks, plan, counts, control.backward, control.scale, global_step, self.reduce
            )
            ctx.world_size = self.world_size
            self.contexts[plan] = ctx
        else:
            ctx.counts, ctx.step = counts, global_step
        ctx.outputs = outputs or ()
        try:
            self.balancer.backward(losses, ctx)
        finally:
            ctx.outputs = ()  # the context outlives the step: keep no activations alive
        return plan, records

    def _balancer_params(self, task_names: Sequence[str]) -> list[nn.Parameter]:
        """The learned balancer parameters a step on ``task_names`` touched."""
        params = self.balancer.task_parameters(task_names)
        return self.learned if params is None else params


class NonfiniteGuard(Hook):
    """The ``nonfinite`` hook: one fused ``isfinite`` check of the step's losses before the
    backward pass (``TrainerConfig.nonfinite``; the modes: ``docs/training.md``).

    Args:
        mode: ``"raise"``, ``"skip_batch"`` or ``"warn"``.
        comm: The run's collectives (under DDP the ranks agree on the verdict).

    Example:
        >>> import torch
        >>> from mtlgraph.training.distributed import Collectives, DistEnv
        >>> from mtlgraph.training.step import NonfiniteGuard
        >>> from mtlgraph.training.state import LossRecord
        >>> guard = NonfiniteGuard("raise", Collectives(DistEnv()))
        >>> loss = torch.tensor(float("nan"))
        >>> guard.drops({"t": loss}, [LossRecord("t", "d", loss, 4)], 6)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.TrainingError: non-finite loss at epoch 1, step 7: task 't' on ...
    """

    name = "nonfinite"

    def __init__(self, mode: str, comm: Collectives) -> None:
        self.mode, self.comm = mode, comm
        self.distributed = comm.enabled
        self.run: Run | None = None  # where messages read the epoch
        self.skipped = 0  # micro-steps dropped by skip_batch
        self.warned = 0

    def on_fit_start(self, run: Run) -> None:
        self.run = run

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        if self.mode == "skip_batch":
            run.log({make_key("model", "all", "train", "skipped_batches"): self.skipped})

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state["skipped"])

    def drops(
        self, losses: dict[str, torch.Tensor], records: Sequence[LossRecord], global_step: int
    ) -> bool:
        """Whether this micro-step's update is dropped (``skip_batch``); raises in ``raise``."""
        values = iter(losses.values())
        total = next(values)
        if len(losses) > 1:  # a plain sum of detached scalars: the cheapest fused check
            total = total.detach()
            for loss in values:
                total = total + loss.detach()
        if not self.distributed:
            if math.isfinite(total.item()):  # one host sync (free on the CPU)
                return False
        else:  # every rank takes the same branch
            flag = (~torch.isfinite(total.detach())).float().reshape(1)
            self.comm.mean_(flag)
            if not bool(flag > 0):
                return False
        culprits = [
            f"task '{r.task}' on dataset '{r.dataset}' has loss {float(r.loss):g}"
            for r in records
            if not bool(torch.isfinite(r.loss))
        ] or ["the sum of the task losses overflows"]
        return self._handle(f"non-finite loss at {self._where(global_step)}: {'; '.join(culprits)}")

    def bad_norm(self, norm: float, task_names: Sequence[str], global_step: int) -> None:
        """A clipped gradient norm was non-finite (the optimizer step was dropped)."""
        tasks = ", ".join(f"'{t}'" for t in task_names)
        self._handle(
            f"non-finite gradient norm ({norm:g}) at {self._where(global_step)}, tasks {tasks}"
        )

    def _where(self, global_step: int) -> str:
        epoch = 0 if self.run is None else self.run.state.epoch
        return f"epoch {epoch + 1}, step {global_step + 1}"

    def _handle(self, message: str) -> bool:
        if self.mode == "raise":
            raise TrainingError(
                f"{message}. Look for NaN/inf in that dataset's inputs and labels, lower lr "
                "or set grad_clip; or set the trainer's nonfinite='skip_batch' to drop such steps"
            )
        self.warned += 1
        if self.warned <= 5:
            action = "update dropped" if self.mode == "skip_batch" else "update applied"
            more = " (further ones are not logged)" if self.warned == 5 else ""
            logger.warning("%s; %s%s", message, action, more)
        if self.mode == "skip_batch":
            self.skipped += 1
            return True
        return False


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
