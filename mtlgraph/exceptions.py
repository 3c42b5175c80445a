"""Exception types raised by mtlgraph.

Every error that mtlgraph raises itself derives from :class:`MtlGraphError`. Errors found while
validating user input gather *all* problems and raise once; the individual problems are kept in
``problems`` so tools and tests can inspect them.

Exceptions raised inside user code (a module's ``forward``, a loss or metric function) are never
wrapped in these types: they keep their own type and traceback and gain a note naming the
operation and task that ran them.
"""

from __future__ import annotations

from collections.abc import Iterable


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
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self._render())

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
    """A name (a registry entry, a metric key) that is not known.

    A :class:`ConfigError` that is also a ``KeyError``, so code written for the dictionaries the
    registries once were (``except KeyError``) keeps working.
    """

    def __str__(self) -> str:  # KeyError would show the message quoted, as a repr
        return self._render()


class CheckpointError(MtlGraphError, RuntimeError):
    """A checkpoint cannot be written, read or applied."""


class TrainingError(MtlGraphError, RuntimeError):
    """Training cannot go on: a non-finite loss or gradient norm (``TrainerConfig.nonfinite``).

    A run-time failure (exit status 1 in the command line), not a configuration error; the
    message names the task, dataset, epoch and step.
    """
