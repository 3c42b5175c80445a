"""What users declare: operations, tasks, losses, module types and the merged model.

Knows nothing of training: a :class:`MultitaskClassifier` computes outputs and losses, and saves
and loads its weights; its ``predict``, ``score`` and ``export`` call :mod:`mtlgraph.inference`.
The training layer decides how losses become updates.
"""

from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.modules import register_module
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import Input, Operation, Task, detach, register_loss

__all__ = [
    "ExecutionPlan",
    "Input",
    "MultitaskClassifier",
    "Operation",
    "Task",
    "detach",
    "register_loss",
    "register_module",
]
