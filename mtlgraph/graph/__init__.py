"""What users declare: operations, tasks, losses, module types and the merged model.

Knows nothing of training: a :class:`MultitaskClassifier` computes outputs and losses, and saves
and loads its weights; its ``predict``, ``score`` and ``export`` call :mod:`mtlgraph.inference`.
The training layer decides how losses become updates.
"""

from mtlgraph.graph.activations import ACTIVATIONS
from mtlgraph.graph.losses import LOSSES
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.graph.modules import MODULES
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import Input, Operation, Task, detach

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "MODULES",
    "ExecutionPlan",
    "Input",
    "MultitaskClassifier",
    "Operation",
    "Task",
    "detach",
]
