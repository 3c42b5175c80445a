"""The training loaders over a run: their iterators, restarts, streams and exact resume.

:class:`TrainLoaders` hands the loop the next batch of loader ``i``: in-memory loaders start over
each epoch (and when they run out), streams are read endlessly with their cursors checkpointed,
and a resumed run puts every loader back where the interrupted run left it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from mtlgraph.data.collate import Batch
from mtlgraph.data.datasets import DictDataLoader
from mtlgraph.data.named import dataset_size
from mtlgraph.data.schedulers import BatchScheduler, SamplingScheduler
from mtlgraph.data.streams import StreamCursor
from mtlgraph.exceptions import CheckpointError, ConfigError


def is_stream(loader: Any) -> bool:
    """True for a :class:`DictDataLoader` over a stream."""
    return bool(getattr(loader, "is_stream", False))


def batch_count(loader: Any) -> int:
    """Batches of a loader per pass (0 for a stream: read endlessly, never counted)."""
    return 0 if is_stream(loader) else len(loader)


def configure_sampling(
    scheduler: BatchScheduler,
    train: Sequence[DictDataLoader],
    steps_per_epoch: int | None,
    n_epochs: int,
) -> None:
    """Give a sampling scheduler the training datasets and the epoch length; refuse streams
    without one, and ``steps_per_epoch`` without one.

    Raises:
        ConfigError: Every problem at once, with the fix.
    """
    streams = [dl.dataset.name for dl in train if is_stream(dl)]
    if not isinstance(scheduler, SamplingScheduler):
        problems = [
            f"training dataset '{name}' is a stream of unknown length; use a sampling "
            "batch_scheduler ('uniform', 'proportional', 'temperature', 'annealed', 'weighted') "
            "with steps_per_epoch"
            for name in streams
        ]
        if steps_per_epoch is not None:
            problems.append(
                f"steps_per_epoch is set but batch_scheduler is '{type(scheduler).__name__}', "
                "which plans whole passes; use a sampling scheduler or drop steps_per_epoch"
            )
        if problems:
            raise ConfigError(problems)
        return
    if steps_per_epoch is None:
        if streams:
            raise ConfigError(
                [
                    f"steps_per_epoch: required with stream '{name}' (training dataset of "
                    "unknown length); set trainer steps_per_epoch: N"
                    for name in streams
                ]
            )
        steps_per_epoch = sum(len(dl) for dl in train)  # about one pass over everything
    names = [dl.dataset.name for dl in train]
    scheduler.configure(
        names, [dataset_size(dl.dataset) for dl in train], steps_per_epoch, n_epochs
    )


class TrainLoaders:
    """The iterators of the training loaders during one ``fit``.

    Args:
        loaders: The training loaders (this rank's shards under DDP).
        fresh_passes: Restart a loader that runs out with a fresh shuffle (else epoch order).
        check: Called with ``(i, batch)`` on every batch :meth:`next` hands out.
    """

    def __init__(
        self,
        loaders: Sequence[DictDataLoader],
        fresh_passes: bool,
        check: Callable[[int, Batch], None] | None = None,
    ) -> None:
        self.loaders = list(loaders)
        self.check = check
        self.fresh_passes = fresh_passes
        self.iterators: list[Iterator[Batch] | None] = [None] * len(self.loaders)
        self.passes = [0] * len(self.loaders)  # restarts of each loader in this epoch

    def start_epoch(self, epoch: int) -> None:
        """Enter ``epoch``: in-memory loaders start over in its order; streams continue."""
        for i, dl in enumerate(self.loaders):
            if not is_stream(dl):
                dl.set_epoch(epoch)
                self.iterators[i], self.passes[i] = None, 0

    def next(self, i: int) -> Batch:
        """The next batch of loader ``i`` (checked, when a ``check`` is given); a loader that
        runs out starts over."""
        it = self.iterators[i]
        batch = None if it is None else next(it, None)
        if batch is None:
            if it is not None and self.fresh_passes:
                self.passes[i] += 1
            batch = next(self._open(i))
        if self.check is not None:
            self.check(i, batch)
        return batch

    def _open(self, i: int) -> Iterator[Batch]:
        dl = self.loaders[i]
        dl.set_pass(self.passes[i])
        with torch.random.fork_rng(devices=[]):  # no draw from the global generator
            it = self.iterators[i] = dl.iterate(repeat=is_stream(dl))
        return it

    def resume(self, positions: Sequence[int], recorded: Sequence[int]) -> None:
        """Put the in-memory loaders after the interrupted epoch's first ``positions`` batches.

        Raises:
            CheckpointError: The plan's positions differ from the checkpoint's.
        """
        if list(positions) != list(recorded):
            raise CheckpointError(
                f"cannot resume: the batch scheduler's plan gives loader positions "
                f"{list(positions)}, the checkpoint recorded {list(recorded)}; resume with the "
                "batch_scheduler and seed of the interrupted run"
            )
        for i, (dl, p) in enumerate(zip(self.loaders, positions, strict=True)):
            if is_stream(dl):
                continue
            n = len(dl)
            passes, start = divmod(p, n) if self.fresh_passes else (0, p % n)
            self.passes[i] = passes
            if start:
                dl.set_pass(passes)
                with torch.random.fork_rng(devices=[]):
                    self.iterators[i] = dl.iterate(start=start)

    def cursor_states(self) -> list[dict[str, Any] | None]:
        """Each stream loader's cursor (``None`` for the others)."""
        return [dl.cursor.state_dict() if is_stream(dl) else None for dl in self.loaders]

    def load_cursor_states(self, states: Sequence[Mapping[str, Any] | None]) -> None:
        """Restore :meth:`cursor_states` (this rank's).

        Raises:
            CheckpointError: The checkpoint's streams do not match these loaders.
        """
        mine = [is_stream(dl) for dl in self.loaders]
        if [s is not None for s in states] != mine:
            raise CheckpointError(
                "cannot resume: the checkpoint's training streams do not match these loaders "
                f"(streams at {[i for i, s in enumerate(states) if s is not None]}, here at "
                f"{[i for i, m in enumerate(mine) if m]}); resume with the data of the "
                "interrupted run"
            )
        for dl, state in zip(self.loaders, states, strict=True):
            if state is not None:
                dl.cursor = StreamCursor.from_state(state, dl.cursor.workers)
