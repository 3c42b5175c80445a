"""SIGINT and SIGTERM during ``fit``: finish the optimizer step in progress, then stop.

:class:`StopSignals` replaces the two handlers for the length of a ``fit`` (in the main thread:
Python runs signal handlers there only) and restores the previous ones on exit, leaving no state
behind. A signal only records a request; the loop asks :meth:`StopSignals.agreed` after each
optimizer step, writes ``checkpoints/last.pt`` and raises
:class:`~mtlgraph.exceptions.TrainingInterrupted`. Under DDP the ranks all-reduce the request
(a max over ranks) at each step boundary, so every rank stops after the same step even when the
signal reached only some of them. A second signal stops at once (no checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from mtlgraph.exceptions import TrainingInterrupted

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop a ``fit`` after the step in progress."""


class StopSignals:
    """The stop request of one ``fit``, set by SIGINT or SIGTERM (a context manager).

    Args:
        reduce_max: Under DDP, the max of an integer tensor over ranks (in place); ``None`` in a
            single process.
        device: Where that tensor lives (the collective's device).

    Example:
        >>> import os, signal
        >>> from mtlgraph.training.signals import StopSignals
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
        self.signum = 0  # the first signal received (0: none)
        self.reduce_max, self.device = reduce_max, device or torch.device("cpu")
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the handlers back as they were before :meth:`__enter__`."""
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
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
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)
        self.reduce_max(flag)
        return int(flag.item())
