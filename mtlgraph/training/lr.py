"""Learning-rate schedules: a factor on every parameter group's base learning rate.

A schedule is ``(progress, epoch, **params) -> factor`` looked up in :data:`LR_SCHEDULES`, with
warm-up applied in front; a schedule that names a ``steps`` parameter also gets the optimizer
steps taken since the warm-up ended. The factor is a pure function of the step counters, so a
checkpoint restores it exactly (see ``docs/training.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from mtlgraph.registry import Registry, accepted_parameters

Unit = Literal["epochs", "steps"]
"""What ``exponential`` and ``step`` count: epochs, or optimizer steps since the warm-up."""


def constant(progress: float, epoch: int) -> float:
    """Always 1."""
    return 1.0


def linear(progress: float, epoch: int, end_factor: float = 0.0, min_factor: float = 0.0) -> float:
    """Falls linearly from 1 to ``end_factor`` at the last step, never below ``min_factor``."""
    return max(min_factor, 1.0 - (1.0 - end_factor) * progress)


def cosine(progress: float, epoch: int, min_factor: float = 0.0) -> float:
    """Half a cosine from 1 to ``min_factor`` at the last step."""
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def exponential(
    progress: float,
    epoch: int,
    gamma: float = 0.9,
    unit: Unit = "epochs",
    min_factor: float = 0.0,
    steps: int = 0,
) -> float:
    """``gamma ** n``, ``n`` the epoch (``unit="epochs"``) or the optimizer steps since the
    warm-up (``unit="steps"``), never below ``min_factor``."""
    return max(min_factor, float(gamma ** (steps if unit == "steps" else epoch)))


def step(
    progress: float,
    epoch: int,
    step_size: int = 1,
    gamma: float = 0.1,
    unit: Unit = "epochs",
    min_factor: float = 0.0,
    steps: int = 0,
) -> float:
    """``gamma ** (n // step_size)``, ``n`` counted as in :func:`exponential`, never below
    ``min_factor``."""
    n = steps if unit == "steps" else epoch
    return max(min_factor, float(gamma ** (n // int(step_size))))


LR_SCHEDULES: Registry[Callable[..., float]] = Registry(
    "LR schedule",
    {fn.__name__: fn for fn in (constant, linear, cosine, exponential, step)},
    supplied={"progress": "remove it", "epoch": "remove it", "steps": "remove it"},
    bind=True,
)
"""Every LR schedule by name; ``LR_SCHEDULES.register(name, fn)`` adds one.

Example:
    >>> from mtlgraph.training.lr import LR_SCHEDULES
    >>> @LR_SCHEDULES.register("halves_doc")
    ... def halves(progress: float, epoch: int, every: int = 2) -> float:
    ...     return 0.5 ** (epoch // every)
    >>> lr_factor_fn({"name": "halves_doc", "every": 1}, 0, 10)(3, 2)
    0.25
    >>> LR_SCHEDULES.problems({"name": "halves_doc", "every": "2"}, "lr_scheduler")
    ["lr_scheduler.every: expected an integer, got the string '2'"]
    >>> _ = LR_SCHEDULES.unregister("halves_doc")
"""


def resolve_warmup(
    warmup_steps: int, warmup_epochs: float, warmup_fraction: float, epoch_steps: Sequence[int]
) -> int:
    """Warm-up in optimizer steps, from whichever of the three settings is given.

    Args:
        warmup_steps: Optimizer steps.
        warmup_epochs: Epochs (a fraction takes its share of the next epoch's steps).
        warmup_fraction: Fraction of all optimizer steps, rounded.
        epoch_steps: Optimizer steps of each epoch of the run.

    Example:
        >>> resolve_warmup(0, 1.5, 0.0, [10, 10, 10]), resolve_warmup(0, 0.0, 0.1, [10, 10, 10])
        (15, 3)
    """
    if warmup_epochs:
        whole = int(warmup_epochs)
        steps = sum(epoch_steps[:whole])
        if whole < len(epoch_steps):
            steps += round((warmup_epochs - whole) * epoch_steps[whole])
        return int(steps)
    if warmup_fraction:
        return round(warmup_fraction * sum(epoch_steps))
    return warmup_steps


def is_constant(schedule: Any, warmup_steps: float) -> bool:
    """Whether the LR factor is always 1 (the ``constant`` schedule without warm-up)."""
    return LR_SCHEDULES.build(schedule, "lr_scheduler") is constant and warmup_steps == 0


def lr_factor_fn(
    schedule: Any, warmup_steps: int, total_steps: int
) -> Callable[[int, int], float] | None:
    """Return ``(global_step, epoch) -> lr factor``, or ``None`` when the factor is always 1.

    Args:
        schedule: A schedule name or ``{"name": ..., **params}``.
        warmup_steps: The factor rises linearly to 1 over this many optimizer steps first.
        total_steps: Optimizer steps of the whole run (``progress`` reaches 1 there).

    Example:
        >>> f = lr_factor_fn("linear", 0, 10)
        >>> f(0, 0), f(5, 0)
        (1.0, 0.5)
    """
    fn = LR_SCHEDULES.build(schedule, "lr_scheduler")
    if fn is constant and warmup_steps == 0:
        return None
    span = max(1, total_steps - warmup_steps)
    accepted = accepted_parameters(fn)
    counts_steps = accepted is None or "steps" in accepted

    def factor(global_step: int, epoch: int) -> float:
        if global_step < warmup_steps:
            return (global_step + 1) / warmup_steps
        done = global_step - warmup_steps  # optimizer steps since the warm-up ended
        if counts_steps:
            return float(fn(min(1.0, done / span), epoch, steps=done))
        return float(fn(min(1.0, done / span), epoch))

    return factor
