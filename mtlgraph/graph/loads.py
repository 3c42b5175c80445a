"""All-or-nothing loads of a model's weights: everything is checked before any parameter changes.

Used by :meth:`~mtlgraph.MultitaskClassifier.load`, ``load_weights`` and resuming: other task
names (renamed tasks whose modules kept their names included), missing or unexpected parameters,
other shapes and other kinds of dtype are reported together, and a refused load leaves the model
as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mtlgraph.exceptions import CheckpointError

if TYPE_CHECKING:
    from mtlgraph.graph.model import MultitaskClassifier


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def state_problems(
    model: MultitaskClassifier, state: object, task_names: object, strict: bool = True
) -> list[str]:
    """Why ``state`` (a state dict saved with ``task_names``) cannot be loaded into ``model``:
    other tasks (renamed ones included), missing or unexpected parameters (with ``strict``),
    other shapes or kinds of dtype. Empty when it loads."""
    if not isinstance(state, Mapping):
        return [f"it holds no state dict (found {type(state).__name__})"]
    problems: list[str] = []
    if isinstance(task_names, (list, tuple)):
        theirs, ours = [str(t) for t in task_names], model.task_names
        foreign = [t for t in theirs if t not in ours]
        absent = [t for t in ours if t not in theirs]
        if foreign or (strict and absent):
            problems.append(
                f"it holds the weights of tasks {theirs}, the model has {ours}"
                + (f" (not in the model: {_names(foreign)})" if foreign else "")
            )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names([str(k) for k in unexpected])}")
    for key, mine in own.items():
        theirs_value = state.get(key)
        if theirs_value is None:
            continue
        if not isinstance(theirs_value, torch.Tensor):
            problems.append(f"'{key}' is a {type(theirs_value).__name__}, not a tensor")
        elif theirs_value.shape != mine.shape:
            problems.append(
                f"'{key}' has shape {tuple(theirs_value.shape)} in the file, "
                f"{tuple(mine.shape)} in the model"
            )
        elif theirs_value.dtype.is_floating_point != mine.dtype.is_floating_point:
            problems.append(
                f"'{key}' is {theirs_value.dtype} in the file, {mine.dtype} in the model"
            )
    return problems


def load_state_checked(
    model: MultitaskClassifier, state: object, task_names: object, strict: bool, what: str
) -> None:
    """Load ``state`` into ``model`` only when :func:`state_problems` finds nothing: a refused
    load leaves every parameter unchanged.

    Raises:
        CheckpointError: ``"cannot load <what> into this model: <problems>"``.
    """
    problems = state_problems(model, state, task_names, strict)
    if problems:
        hint = "; pass strict=False to load the matching part" if strict else ""
        raise CheckpointError(f"cannot load {what} into this model: {'; '.join(problems)}{hint}")
    assert isinstance(state, Mapping)
    model.load_state_dict(state, strict=False)
