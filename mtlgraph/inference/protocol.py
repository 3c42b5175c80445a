"""What inference needs of a model (:class:`InferenceModel`: the public ``tasks``, ``device``,
``plan`` and ``execute``), and the one way to run a model in evaluation mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import Task

Batches = Iterable[tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]]
"""Batches ``(X_dict, Y_dict)``: a loader or any iterable of them."""


class HasModules(Protocol):
    """Anything with submodules and a training mode (an ``nn.Module``)."""

    def modules(self) -> Iterator[nn.Module]: ...

    def train(self, mode: bool = ...) -> Any: ...


class InferenceModel(HasModules, Protocol):
    """The members of a model that predict, score and export use."""

    @property
    def tasks(self) -> Mapping[str, Task]: ...

    @property
    def task_names(self) -> list[str]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def module_pool(self) -> nn.ModuleDict: ...

    def plan(self, task_names: Iterable[str]) -> ExecutionPlan: ...  # GraphError: unknown tasks

    def execute(self, plan: ExecutionPlan, X_dict: Mapping[str, Any]) -> dict[int, Any]: ...


@contextlib.contextmanager
def eval_mode(model: HasModules, only: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Run the body with every submodule in evaluation mode, then restore each one's own flag.

    ``only``: switch just these modules (and theirs), the ones a forward pass will run: on a
    model of many tasks, a pass over a few of them does not walk every module twice.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = model[1].eval()
        >>> with eval_mode(model):
        ...     [m.training for m in model.modules()]
        [False, False, False]
        >>> [m.training for m in model.modules()]
        [True, True, False]
    """
    roots = [model] if only is None else list(dict.fromkeys(only))
    modes = list({id(m): (m, m.training) for r in roots for m in r.modules()}.values())
    for root in roots:
        root.train(False)  # through train(): a module that overrides it is told
    try:
        yield
    finally:
        for m, training in modes:  # parents first: a parent's train() also sets its children
            if m.training != training:
                m.train(training)
