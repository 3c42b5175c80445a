"""The run state: everything a training run knows about itself, in one :class:`RunState`
(progress counters, history, loss windows, the epoch's plan, stream cursors); its
``state_dict()`` is a checkpoint's ``run`` entry. Training losses are :class:`LossRecord` lists,
turned into count-weighted means by the helpers below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from mtlgraph.data.schedulers import Step
from mtlgraph.metrics import make_key

TRAIN_LOSS = make_key("model", "all", "train", "loss")
"""The key of the count-weighted mean training loss over every task and dataset."""


class LossRecord(NamedTuple):
    """One task's training loss on one batch: what the loss window and logs are built from."""

    task: str  # task name
    dataset: str  # dataset name
    loss: torch.Tensor  # the batch's mean loss over its labelled rows (a 0-d tensor)
    count: int  # type: ignore[assignment]  # labelled rows (or elements) the loss averages over


Records = list[LossRecord]


@dataclass
class RunState:
    """The state of one training run (one ``fit``); ``Trainer.state`` after ``fit``.

    The next step is step ``step_in_epoch`` of epoch ``epoch`` (both 0-based);
    ``step_in_epoch == len(plan)`` means the epoch's steps are done but its end (balancer hook,
    evaluation) is not. ``epoch == n_epochs`` after the run.

    Example:
        >>> from mtlgraph.training.state import RunState
        >>> state = RunState(epoch=1, step_in_epoch=3, global_step=13, batch_counts=[2, 1])
        >>> state.plan = [(0,), (1,), (0,)]
        >>> restored = RunState()
        >>> restored.load_state_dict(state.state_dict())
        >>> (restored.epoch, restored.step_in_epoch, restored.global_step)
        (1, 3, 13)
        >>> state.state_dict()["progress"]["loader_positions"]  # batches each loader gave
        [2, 1]
    """

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches (micro-steps) of the epoch's plan taken
    global_step: int = 0  # optimizer steps taken in the run
    last_logged: int = -1  # global_step of the last evaluation record
    history: list[dict[str, float]] = field(default_factory=list)  # logged records, in order
    window: Records = field(default_factory=list)  # training losses since the last evaluation
    epoch_losses: Records = field(default_factory=list)  # training losses of this epoch
    plan: list[Step] = field(default_factory=list)  # this epoch's steps (loader indices)
    scheduler_state: dict[str, Any] = field(default_factory=dict)  # at the start of `epoch`
    batch_counts: list[int] = field(default_factory=list)  # batches of each training loader
    world_size: int = 1  # processes of the run (a resume needs as many)
    streams: list[Any] = field(default_factory=list)  # per rank: each training loader's
    # stream cursor state (None: not a stream), set before a checkpoint is written
    stop_reason: str | None = None  # why a hook stopped the run (Run.stop); None: it was not

    @property
    def epoch_number(self) -> int:
        """The 1-based epoch a record logged now belongs to (the epoch in progress, or the one
        just finished)."""
        return self.epoch + 1 if self.step_in_epoch > 0 else self.epoch

    def start_epoch(self, epoch: int, plan: list[Step], scheduler_state: dict[str, Any]) -> None:
        """Enter ``epoch`` with its ``plan``; ``scheduler_state`` is the scheduler's before it."""
        self.epoch, self.step_in_epoch = epoch, 0
        self.plan, self.scheduler_state = plan, scheduler_state
        self.epoch_losses = []

    def add_losses(self, records: Records) -> None:
        """Records of one micro-step: they join the window and the epoch's losses."""
        self.step_in_epoch += 1
        if records:
            self.window += records
            self.epoch_losses += records

    def end_epoch(self, scheduler_state: dict[str, Any]) -> None:
        """The epoch is over: a checkpoint from here on resumes at the start of the next one."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.plan, self.scheduler_state = [], scheduler_state
        self.epoch_losses = []

    def take_window(self) -> Records:
        """The loss window, emptied (an evaluation record averages it)."""
        window, self.window = self.window, []
        return window

    def loader_positions(self) -> list[int]:
        """Batches each training loader has given this epoch."""
        return loader_positions(self.plan[: self.step_in_epoch], len(self.batch_counts))

    def state_dict(self, rank_records: Sequence[tuple[Records, Records]] = ()) -> dict[str, Any]:
        """Plain values and tensors (checkpoint-safe).

        Args:
            rank_records: Under DDP, every rank's ``(window, epoch_losses)``: each rank resumes
                with its own loss records.
        """
        state: dict[str, Any] = {
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "last_logged": self.last_logged,
                "batch_counts": list(self.batch_counts),
                "loader_positions": self.loader_positions(),
                "world_size": int(self.world_size),
                "stop_reason": self.stop_reason,
            },
            "scheduler": dict(self.scheduler_state),
            "history": [{k: float(v) for k, v in r.items()} for r in self.history],
            "window": records_state(self.window),
            "epoch_losses": records_state(self.epoch_losses),
            "rank_records": [
                {"window": records_state(w), "epoch_losses": records_state(e)}
                for w, e in rank_records
            ],
        }
        if any(s is not None for rank in self.streams for s in rank):  # a run with streams
            state["streams"] = [list(s) for s in self.streams]
        return state

    def load_state_dict(self, state: Mapping[str, Any], rank: int = 0) -> None:
        """Restore :meth:`state_dict`'s values; ``rank`` picks this rank's loss records. The
        plan is not saved: the loop recomputes it from ``scheduler_state``."""
        progress = state["progress"]
        self.epoch = int(progress["epoch"])
        self.step_in_epoch = int(progress["step_in_epoch"])
        self.global_step = int(progress["global_step"])
        self.last_logged = int(progress["last_logged"])
        self.batch_counts = [int(c) for c in progress["batch_counts"]]
        self.world_size = int(progress.get("world_size", 1))
        self.stop_reason = progress.get("stop_reason")
        self.scheduler_state = dict(state["scheduler"])
        self.history = [dict(r) for r in state["history"]]
        self.window = records_from_state(state["window"])
        self.epoch_losses = records_from_state(state["epoch_losses"])
        self.streams = [list(s) for s in state.get("streams") or []]
        per_rank = state.get("rank_records") or []
        if self.world_size > 1 and len(per_rank) == self.world_size:
            self.window = records_from_state(per_rank[rank]["window"])
            self.epoch_losses = records_from_state(per_rank[rank]["epoch_losses"])


def loader_positions(plan: Sequence[Step], n_loaders: int) -> list[int]:
    """Batches each training loader has given after the steps ``plan`` (a prefix of an epoch)."""
    counts = [0] * n_loaders
    for step in plan:
        for i in step:
            counts[i] += 1
    return counts


# ---------------------------------------------------------------- loss records


def records_state(records: Records) -> dict[str, Any]:
    """Loss records as plain lists and one float tensor (exact values kept)."""
    return {
        "task": [r.task for r in records],
        "dataset": [r.dataset for r in records],
        "loss": torch.stack([r.loss.detach().float().cpu() for r in records])
        if records
        else torch.zeros(0),
        "n": [int(r.count) for r in records],
    }


def records_from_state(state: Mapping[str, Any]) -> Records:
    """Inverse of :func:`records_state`."""
    return [
        LossRecord(t, d, loss, int(n))
        for t, d, loss, n in zip(
            state["task"], state["dataset"], state["loss"], state["n"], strict=True
        )
    ]


def cpu_records(records: Records) -> Records:
    """The records with their losses as float CPU tensors (to send to other ranks)."""
    return [r._replace(loss=r.loss.detach().float().cpu()) for r in records]


def loss_sums(records: Records) -> dict[tuple[str, str], list[float]]:
    """``{(task, dataset): [sum of loss * count, sum of count]}`` over loss records."""
    if not records:
        return {}
    values = torch.stack([r.loss.float() for r in records]).tolist()
    sums: dict[tuple[str, str], list[float]] = {}
    for r, v in zip(records, values, strict=True):
        acc = sums.setdefault((r.task, r.dataset), [0.0, 0.0])
        acc[0] += v * r.count
        acc[1] += r.count
    return sums


def train_losses(sums: Mapping[tuple[str, str], list[float]]) -> dict[str, float]:
    """Count-weighted mean training loss per (task, dataset) and overall, from loss sums."""
    out = {make_key(t, d, "train", "loss"): s / c for (t, d), (s, c) in sums.items() if c}
    count = sum(c for _, c in sums.values())
    if count:
        out[TRAIN_LOSS] = sum(s for s, _ in sums.values()) / count
    return out


def task_means(sums: Mapping[tuple[str, str], list[float]]) -> dict[str, float]:
    """Count-weighted mean loss per task, from loss sums."""
    per_task: dict[str, list[float]] = {}
    for (task_name, _), (s, c) in sums.items():
        acc = per_task.setdefault(task_name, [0.0, 0.0])
        acc[0] += s
        acc[1] += c
    return {t: s / c for t, (s, c) in per_task.items() if c}
