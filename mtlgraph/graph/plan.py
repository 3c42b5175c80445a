"""The execution plan: what one forward pass over a set of tasks runs, built by
:meth:`MultitaskClassifier.plan <mtlgraph.MultitaskClassifier.plan>` and cached per set of tasks.

A plan is plain data (node ids, modules, their inputs), so code that runs a model's tasks (the
trainer's step, :mod:`mtlgraph.inference`) needs the plan and ``model.execute``, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

INPUT_ID = -1
"""Source id of the batch's ``X_dict`` in a node's inputs."""

Source = tuple[int, str | int | None, bool]
"""A node's input: (source node id or :data:`INPUT_ID`, key or index or None, detach flag)."""


@dataclass(frozen=True, eq=False)  # identity: a plan is hashable, so caches key on the plan
class ExecutionPlan:
    """What one forward pass over a set of tasks runs, precomputed and cached.

    Attributes:
        task_names: The tasks, in the order they were requested.
        steps: ``(node_id, module, inputs)`` in topological order, each node once.
        outputs: Task name -> node id of the task output.
        named_outputs: ``(key, node_id)`` pairs for :meth:`MultitaskClassifier.forward`.
        module_names: Modules the plan runs.
        task_modules: Task name -> the modules its operations use.
        parameters: Parameters of ``module_names`` (deduplicated, trainable or not).
    """

    task_names: tuple[str, ...]
    steps: tuple[tuple[int, nn.Module, tuple[Source, ...]], ...]
    outputs: Mapping[str, int]
    named_outputs: tuple[tuple[str, int], ...]
    module_names: tuple[str, ...]
    task_modules: Mapping[str, tuple[str, ...]]
    parameters: tuple[nn.Parameter, ...]
