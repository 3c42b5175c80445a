"""Exception types raised by mtlgraph, all derived from :class:`MtlGraphError`.

Validation errors gather *all* problems (kept in ``problems``) and raise once. Exceptions raised
inside user code are never wrapped: they keep their type and gain a note.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = [
    "ArgumentCheck",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GraphError",
    "Interrupted",
    "MtlGraphError",
    "TaskDefinitionError",
    "TrainingError",
    "TrainingInterrupted",
    "UnknownNameError",
]


class MtlGraphError(Exception):
    """Base class of every exception mtlgraph raises itself."""


class _ProblemsError(MtlGraphError, ValueError):
    """An error that reports one or more problems at once.

    Args:
        problems: One human-readable sentence per problem.
        header: Optional first line naming what was being validated.
    """

    def __init__(self, problems: Iterable[str], header: str | None = None) -> None:
        # one string is one problem (a DataLoader worker re-raises an error from its message)
        if isinstance(problems, str):
            header, problems = self._from_worker(problems, header)
        self.problems: list[str] = list(problems)
        self.header = header
        super().__init__(self._render())

    @classmethod
    def _from_worker(cls, text: str, header: str | None) -> tuple[str | None, list[str]]:
        """The problems of ``text``: a DataLoader worker re-raises an error as
        ``cls("Caught <name> in DataLoader worker process N.\nOriginal Traceback ...")``;
        its own message, last in that traceback, is what the user needs, without the
        worker's traceback (``--debug`` shows where it was re-raised)."""
        marker = f"\n{cls.__module__}.{cls.__qualname__}: "
        if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
            return header, [text]
        at = text.rfind(marker)
        if at < 0:
            return header, [text]
        lines = text[at + len(marker) :].rstrip("\n").split("\n")
        listed = [i for i, line in enumerate(lines) if line.startswith("  - ")]
        if len(lines) > 1 and listed == list(range(1, len(lines))):  # a header and its list
            return lines[0], [line[4:] for line in lines[1:]]
        return header, ["\n".join(lines)]

    def _render(self) -> str:
        if len(self.problems) == 1 and self.header is None:
            return self.problems[0]
        lines = [self.header or f"{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class TaskDefinitionError(_ProblemsError):
    """An :class:`~mtlgraph.Operation` or :class:`~mtlgraph.Task` is malformed."""


class GraphError(_ProblemsError):
    """Tasks cannot be merged into one model (name clashes, unknown tasks, bad labels)."""


class DataError(_ProblemsError):
    """A dataset, batch or data file is malformed."""


class ConfigError(_ProblemsError):
    """A configuration (Trainer keyword arguments or a YAML file) is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A name (a registry entry, a metric key) that is not known; also a ``KeyError``, so
    ``except KeyError`` (written for the dictionaries the registries once were) keeps working."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a repr
        return self._render()


class ArgumentCheck:
    """Gathers every problem with a component's constructor arguments; :meth:`done` raises them
    at once as a :class:`ConfigError`.

    Args:
        subject: The component, as the messages name it (``"balancer 'cagrad'"``, ``"gate"``).

    Example:
        >>> from mtlgraph.exceptions import ArgumentCheck
        >>> check = ArgumentCheck("gate")
        >>> check.integer("k", 0)
        >>> check.number("gamma", float("nan"), "> 0", lambda v: v > 0)
        >>> check.choice("kind", "soft", ("softmax", "dselect_k"))
        >>> check.require(True, "never reported")
        >>> check.done()
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: 3 problems:
          - gate: k must be an integer >= 1, got 0
          - gate: gamma must be a finite number > 0, got nan
          - gate: kind must be 'softmax' or 'dselect_k', got 'soft'
    """

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.problems: list[str] = []

    def require(self, ok: bool, message: str) -> None:
        """Record ``message`` (``"<name> must be ..., got ..."``) unless ``ok``."""
        if not ok:
            self.problems.append(f"{self.subject}: {message}")

    def choice(self, name: str, value: object, choices: Sequence[str]) -> None:
        """``value`` must be one of ``choices``."""
        *head, last = [repr(c) for c in choices]
        expected = f"{', '.join(head)} or {last}" if head else last
        self.require(value in choices, f"{name} must be {expected}, got {value!r}")

    def integer(self, name: str, value: object, least: int = 1) -> None:
        """``value`` must be an integer (not a bool) of at least ``least``."""
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        self.require(ok, f"{name} must be an integer >= {least}, got {value!r}")

    def number(
        self,
        name: str,
        value: object,
        rule: str = "",
        ok: Callable[[float], bool] = lambda v: True,
        *,
        optional: bool = False,
    ) -> None:
        """``value`` must be a finite int or float (not a bool) for which ``ok`` holds (``rule``
        says what that means: ``"> 0"``, ``"in [0, 1)"``); ``None`` too when ``optional``."""
        if optional and value is None:
            return
        fits = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and ok(float(value))
        )
        rule = f"{' ' if rule else ''}{rule}{' or None' if optional else ''}"
        self.require(fits, f"{name} must be a finite number{rule}, got {value!r}")

    def done(self) -> None:
        """Raise every recorded problem at once as a :class:`ConfigError`."""
        if self.problems:
            raise ConfigError(self.problems)


class CheckpointError(MtlGraphError, RuntimeError):
    """A checkpoint cannot be written, read or applied."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM (``timeout``, a job scheduler,
    Kubernetes); :mod:`mtlgraph.signals` raises it. A :class:`KeyboardInterrupt`, so code
    that lets Ctrl-C through lets this through too, and ``finally`` blocks and atomic writers
    clean up on the way out.

    Args:
        signum: The signal's number (``signal.SIGINT`` or ``signal.SIGTERM``).
        message: The exception's text (default: what :attr:`stopped` says).

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        exit_status: ``128 + signum``: 130 for SIGINT, 143 for SIGTERM (the CLI exits with it).
        stopped: How the command line says it: ``"interrupted (Ctrl-C)"`` or
            ``"terminated (SIGTERM)"``.
        details: What the interrupted command left behind, one phrase each (the CLI prints
            them after :attr:`stopped`).

    Example:
        >>> import signal
        >>> from mtlgraph.exceptions import Interrupted
        >>> e = Interrupted(signal.SIGTERM)
        >>> e.exit_status, e.stopped
        (143, 'terminated (SIGTERM)')
    """

    def __init__(self, signum: int, message: str | None = None) -> None:
        import signal

        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        self.exit_status = 128 + self.signum
        sigint = self.signum == signal.SIGINT
        self.stopped = "interrupted (Ctrl-C)" if sigint else f"terminated ({self.signal_name})"
        self.details: list[str] = []
        super().__init__(message or self.stopped)


class TrainingInterrupted(Interrupted):
    """``fit`` stopped on SIGINT or SIGTERM after the optimizer step in progress; the run's
    ``checkpoints/last.pt`` (when it has a ``run_dir``) resumes it exactly.

    An :class:`Interrupted`, so code that lets Ctrl-C through lets this through too.

    Attributes:
        signum: The signal's number (``signal.SIGINT`` or ``signal.SIGTERM``).
        step: Optimizer steps taken when the run stopped (``None``: stopped inside a step, by
            a second signal).
        checkpoint: The ``last.pt`` written (``None``: no ``run_dir``, or a second signal).
        exit_status: ``128 + signum``: 130 for SIGINT, 143 for SIGTERM (the CLI exits with it).

    Example:
        >>> import signal
        >>> from mtlgraph.exceptions import TrainingInterrupted
        >>> e = TrainingInterrupted(signal.SIGTERM, step=12, checkpoint=None)
        >>> e.exit_status, str(e)
        (143, 'training stopped by SIGTERM after step 12')
    """

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None) -> None:
        import signal

        self.step, self.checkpoint = step, checkpoint
        name = signal.Signals(int(signum)).name
        where = f"after step {step}" if step is not None else "inside a step (a second signal)"
        super().__init__(signum, f"training stopped by {name} {where}")


class TrainingError(MtlGraphError, RuntimeError):
    """Training cannot go on: a non-finite loss or gradient norm (``TrainerConfig.nonfinite``);
    the message names the task, dataset, epoch and step."""
