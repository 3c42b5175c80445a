"""The model file: a checkpoint that holds a model (``format``, ``version``, ``task_names``,
``model``), read with ``torch.load(weights_only=True)`` and loaded all or nothing.

:meth:`~mtlgraph.MultitaskClassifier.load` reads a model file or a training checkpoint; a load
that does not fit (other tasks, missing or unexpected parameters, shapes, dtypes) reports every
difference and leaves the parameters as they were. Files of the older ``"mtlgraph.model"``
format are converted on load (``docs/checkpoints.md``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from mtlgraph._io import load_weights_only
from mtlgraph._suggest import first_few
from mtlgraph.exceptions import CheckpointError

FORMAT = "mtlgraph.checkpoint"
"""The format marker of checkpoints and model files."""
VERSION = 3
"""The newest checkpoint version this mtlgraph writes and reads."""
_OLD_MODEL_FORMAT = "mtlgraph.model"  # model files of older releases: converted on read


class _Model(Protocol):
    """What a load needs of a model (a :class:`~mtlgraph.MultitaskClassifier`)."""

    @property
    def task_names(self) -> list[str]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def named_modules(self) -> Iterator[tuple[str, Any]]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = ..., assign: bool = ...
    ) -> Any: ...


def model_entries(model: _Model) -> dict[str, Any]:
    """The model's entries of a checkpoint: the whole content of a model file.

    Example:
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> model = MultitaskClassifier(
        ...     [Task("t", {"m": nn.Linear(2, 3)}, [Operation("m", [("_input_", "x")])])]
        ... )
        >>> entries = model_entries(model)
        >>> entries["format"], entries["task_names"], sorted(entries["model"])
        ('mtlgraph.checkpoint', ['t'], ['module_pool.m.bias', 'module_pool.m.weight'])
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "task_names": list(model.task_names),
        "model": model.state_dict(),
    }


def read_checkpoint(
    file: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """A checkpoint or model file's content (``weights_only``), its format and version checked.

    Raises:
        CheckpointError: Unreadable, truncated, pickled or foreign file, or a newer version.
    """
    state = load_weights_only(file, map_location)
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if isinstance(state, dict) and found == _OLD_MODEL_FORMAT:
        names, model = state.get("task_names"), state.get("state_dict")
        return {"format": FORMAT, "version": VERSION, "task_names": names, "model": model}
    if not isinstance(state, dict) or found != FORMAT:
        raise CheckpointError(
            f"'{os.fspath(file)}' is not an mtlgraph training checkpoint or model file "
            f"(format {found!r})"
        )
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"checkpoint '{os.fspath(file)}' has format version {state['version']}; this "
            f"mtlgraph reads up to {VERSION}: upgrade mtlgraph"
        )
    return state


def _names(names: Sequence[object]) -> str:
    return first_few([f"'{n}'" for n in names], 4)


def state_problems(
    model: _Model, state: object, task_names: object, strict: bool = True
) -> list[str]:
    """Why ``state`` (saved with ``task_names``) cannot be loaded into ``model`` (empty: it can)."""
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
        problems.append(f"unexpected {_names(unexpected)}")
    for key, mine in own.items():
        saved = state.get(key)
        if saved is None or key.endswith(EXTRA_STATE):
            continue
        if not isinstance(saved, torch.Tensor):
            problems.append(f"'{key}' is a {type(saved).__name__}, not a tensor")
        elif saved.shape != mine.shape:
            shapes = f"{tuple(saved.shape)} in the file, {tuple(mine.shape)} in the model"
            problems.append(f"'{key}' has shape {shapes}")
        elif saved.dtype.is_floating_point != mine.dtype.is_floating_point:
            problems.append(f"'{key}' is {saved.dtype} in the file, {mine.dtype} in the model")
    return problems + extra_state_problems(model, state)


EXTRA_STATE = "_extra_state"
"""The state-dict key suffix of a module's ``get_extra_state()`` (plain values, not tensors)."""


def extra_state_problems(model: _Model, state: Mapping[str, Any]) -> list[str]:
    """What modules with an ``extra_state_problems(saved)`` method (a pretrained encoder: the
    base its checkpoint was trained on) say about the saved extra state, each named."""
    problems = []
    for name, module in model.named_modules():
        check = getattr(module, "extra_state_problems", None)
        key = f"{name}.{EXTRA_STATE}"
        if check is not None and key in state:
            short = name.removeprefix("module_pool.")
            problems += [f"module '{short}': {p}" for p in check(state[key])]
    return problems


def load_model_state(
    model: _Model,
    checkpoint: Mapping[str, Any],
    what: str,
    strict: bool = True,
    hint: str = "load a checkpoint of this model",
) -> None:
    """Load a checkpoint's ``model`` entry into ``model``, all or nothing.

    Args:
        model: The model.
        checkpoint: What :func:`read_checkpoint` returned.
        what: The file, for the message (``"'run/checkpoints/last.pt'"``).
        strict: Require exactly the model's tasks and parameters.
        hint: The fix the message suggests.

    Raises:
        CheckpointError: ``"<what> is from another model: <problems>; <hint>"``.
    """
    state, names = checkpoint.get("model"), checkpoint.get("task_names")
    problems = state_problems(model, state, names, strict)
    if problems:
        raise CheckpointError(f"{what} is from another model: {'; '.join(problems)}; {hint}")
    assert isinstance(state, Mapping)
    model.load_state_dict(state, strict=False)
