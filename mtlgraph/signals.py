"""SIGINT and SIGTERM: the one place that installs and restores their handlers.

Two behaviours, one mechanism (:class:`SignalHandlers`: replace both handlers for a block, in the
main thread, and put the previous ones back on the way out, leaving no state behind):

- :class:`RaiseOnSignals` (every ``mtlgraph`` command): the first signal raises
  :class:`~mtlgraph.exceptions.Interrupted`, as Ctrl-C raises ``KeyboardInterrupt``, so that
  ``finally`` blocks and atomic writers clean up (no temporary file, an older file intact); a
  second one during that clean-up is ignored. :func:`interrupted` maps any
  ``KeyboardInterrupt`` to its signal, exit status (130 / 143) and message.
- :class:`StopSignals` (``fit``): a signal only records a request; the loop asks
  :meth:`StopSignals.agreed` after each optimizer step, writes ``checkpoints/last.pt`` and raises
  :class:`~mtlgraph.exceptions.TrainingInterrupted`. Under DDP the ranks all-reduce the request
  (a max over ranks) at each step boundary, so every rank stops after the same step even when the
  signal reached only some of them. A second signal stops at once (no checkpoint).

A reader process (a DataLoader worker) leaves both signals to the main process
(:func:`ignore_stop_signals`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from mtlgraph.exceptions import Interrupted, TrainingInterrupted

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "STOP_SIGNALS",
    "RaiseOnSignals",
    "SignalHandlers",
    "StopSignals",
    "ignore_stop_signals",
    "interrupted",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a command (a ``fit`` after the step in progress)."""


def interrupted(error: KeyboardInterrupt, detail: str | None = None) -> Interrupted:
    """``error`` as an :class:`~mtlgraph.exceptions.Interrupted` (itself when it is one; a plain
    ``KeyboardInterrupt`` is SIGINT), with ``detail`` (what the command left behind) added: the
    signal's exit status and the command line's message.

    Example:
        >>> from mtlgraph.signals import interrupted
        >>> stop = interrupted(KeyboardInterrupt(), "nothing was written")
        >>> stop.exit_status, stop.stopped, stop.details
        (130, 'interrupted (Ctrl-C)', ['nothing was written'])
    """
    stop = error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)
    if detail is not None:
        stop.details.append(detail)
    return stop


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a reader process: ignore SIGINT and SIGTERM (a terminal's Ctrl-C and schedulers signal
    the whole process group); the main process stops the command and its readers (a DataLoader
    ``worker_init_fn``)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class SignalHandlers:
    """SIGINT and SIGTERM call :meth:`handle` inside the block (a context manager; in the main
    thread only: Python runs signal handlers there only); the previous handlers are back after."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalHandlers:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the handlers back as they were before :meth:`__enter__`."""
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """What a signal does inside the block."""
        raise NotImplementedError


class RaiseOnSignals(SignalHandlers):
    """Inside: the first SIGINT or SIGTERM raises :class:`~mtlgraph.exceptions.Interrupted`;
    later ones are ignored until the block ends (the clean-up runs to its end).

    Example:
        >>> import os, signal
        >>> from mtlgraph.exceptions import Interrupted
        >>> from mtlgraph.signals import RaiseOnSignals
        >>> before = signal.getsignal(signal.SIGTERM)
        >>> try:
        ...     with RaiseOnSignals():
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ... except Interrupted as e:
        ...     print(e.exit_status, e.stopped)
        143 terminated (SIGTERM)
        >>> signal.getsignal(signal.SIGTERM) is before
        True
    """

    def __enter__(self) -> RaiseOnSignals:
        super().__enter__()
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)


class StopSignals(SignalHandlers):
    """The stop request of one ``fit``, set by SIGINT or SIGTERM (a context manager).

    Args:
        reduce_max: Under DDP, the max of an integer tensor over ranks (in place); ``None`` in a
            single process.
        device: Where that tensor lives (the collective's device; default: the CPU).

    Example:
        >>> import os, signal
        >>> from mtlgraph.signals import StopSignals
        >>> before = signal.getsignal(signal.SIGTERM)
        >>> with StopSignals() as stop:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     stop.agreed() == signal.SIGTERM
        True
        >>> signal.getsignal(signal.SIGTERM) is before
        True
    """

    def __init__(
        self,
        reduce_max: Callable[[torch.Tensor], Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.signum = 0  # the first signal received (0: none)
        self.reduce_max, self.device = reduce_max, device

    def __enter__(self) -> StopSignals:
        super().__enter__()
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # a second signal: stop now, inside the step
            self.restore()
            raise TrainingInterrupted(signum, step=None, checkpoint=None)
        self.signum = signum
        logger.warning(
            "%s received: stopping after the optimizer step in progress and writing "
            "checkpoints/last.pt (send it again to stop at once, without a checkpoint)",
            signal.Signals(signum).name,
        )

    def agreed(self) -> int:
        """The signal every rank stops for (0: go on); a collective under DDP."""
        if self.reduce_max is None:
            return self.signum
        import torch  # a collective: torch is loaded by then

        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)
        self.reduce_max(flag)
        return int(flag.item())
