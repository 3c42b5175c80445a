"""mtlgraph: declarative task-graph multi-task learning for PyTorch.

Tasks name their modules; a :class:`MultitaskClassifier` merges modules by name into one shared
graph; a :class:`Trainer` mixes batches from many datasets; a :class:`Scorer` reports every result
under ``task/dataset/split/metric``.
"""

from mtlgraph.balancing import Balancer, GradientBalancer, StepContext, register_balancer
from mtlgraph.data import DictDataLoader, DictDataset
from mtlgraph.data.schedulers import BatchScheduler, register_scheduler
from mtlgraph.diagnostics import DiagnosticsConfig, DiagnosticsReport
from mtlgraph.exceptions import (
    CheckpointError,
    ConfigError,
    DataError,
    GraphError,
    MtlGraphError,
    TaskDefinitionError,
)
from mtlgraph.graph import MultitaskClassifier
from mtlgraph.graph.modules import register_module
from mtlgraph.graph.task import Input, Operation, Task, detach, register_loss
from mtlgraph.metrics import Scorer, register_metric
from mtlgraph.training.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "BatchScheduler",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiagnosticsConfig",
    "DiagnosticsReport",
    "DictDataLoader",
    "DictDataset",
    "GradientBalancer",
    "GraphError",
    "Input",
    "MtlGraphError",
    "MultitaskClassifier",
    "Operation",
    "Scorer",
    "StepContext",
    "Task",
    "TaskDefinitionError",
    "Trainer",
    "__version__",
    "detach",
    "register_balancer",
    "register_loss",
    "register_metric",
    "register_module",
    "register_scheduler",
]
