"""mtlgraph: declarative task-graph multi-task learning for PyTorch.

The public names are imported lazily (PEP 562), so ``mtlgraph --version`` answers without
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from mtlgraph.balancing import Balancer, GradientBalancer, StepContext
    from mtlgraph.data.datasets import DictDataLoader, DictDataset
    from mtlgraph.data.named import NamedDataset
    from mtlgraph.data.schedulers import BatchScheduler
    from mtlgraph.diagnostics import DiagnosticsConfig, DiagnosticsReport
    from mtlgraph.exceptions import (
        CheckpointError,
        ConfigError,
        DataError,
        GraphError,
        MtlGraphError,
        TaskDefinitionError,
        TrainingError,
    )
    from mtlgraph.graph.model import MultitaskClassifier
    from mtlgraph.graph.task import Input, Operation, Task, detach
    from mtlgraph.metrics import Scorer, register_metric
    from mtlgraph.training.early_stopping import EarlyStopping
    from mtlgraph.training.hooks import Hook
    from mtlgraph.training.trainer import Trainer

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_WHERE: dict[str, str] = {
    "Balancer": "mtlgraph.balancing",
    "BatchScheduler": "mtlgraph.data.schedulers",
    "CheckpointError": "mtlgraph.exceptions",
    "ConfigError": "mtlgraph.exceptions",
    "DataError": "mtlgraph.exceptions",
    "DiagnosticsConfig": "mtlgraph.diagnostics",
    "DiagnosticsReport": "mtlgraph.diagnostics",
    "DictDataLoader": "mtlgraph.data.datasets",
    "DictDataset": "mtlgraph.data.datasets",
    "EarlyStopping": "mtlgraph.training.early_stopping",
    "GradientBalancer": "mtlgraph.balancing",
    "GraphError": "mtlgraph.exceptions",
    "Hook": "mtlgraph.training.hooks",
    "Input": "mtlgraph.graph.task",
    "MtlGraphError": "mtlgraph.exceptions",
    "MultitaskClassifier": "mtlgraph.graph.model",
    "NamedDataset": "mtlgraph.data.named",
    "Operation": "mtlgraph.graph.task",
    "Scorer": "mtlgraph.metrics",
    "StepContext": "mtlgraph.balancing",
    "Task": "mtlgraph.graph.task",
    "TaskDefinitionError": "mtlgraph.exceptions",
    "Trainer": "mtlgraph.training.trainer",
    "TrainingError": "mtlgraph.exceptions",
    "detach": "mtlgraph.graph.task",
    "register_metric": "mtlgraph.metrics",
}

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
    "EarlyStopping",
    "GradientBalancer",
    "GraphError",
    "Hook",
    "Input",
    "MtlGraphError",
    "MultitaskClassifier",
    "NamedDataset",
    "Operation",
    "Scorer",
    "StepContext",
    "Task",
    "TaskDefinitionError",
    "Trainer",
    "TrainingError",
    "__version__",
    "detach",
    "register_metric",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlgraph' has no attribute {name!r}")
    # __import__ rather than importlib.import_module: the same import, but `python -X importtime`
    # then reports these modules under their own names (bench/startup.py relies on it)
    value = getattr(__import__(module, fromlist=[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
