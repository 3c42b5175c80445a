"""Training: the loop, its config, LR schedules, the step, run state and hooks, optimizer set-up,
checkpoints, writers and distributed helpers.
"""

from mtlgraph.training.checkpoint import load_checkpoint, resolve_checkpoint, run_directory
from mtlgraph.training.distributed import DistEnv
from mtlgraph.training.early_stopping import EarlyStopping
from mtlgraph.training.hooks import HOOKS, Every, Hook, Run
from mtlgraph.training.lr import LR_SCHEDULES
from mtlgraph.training.optim import OPTIMIZERS
from mtlgraph.training.state import LossRecord, RunState
from mtlgraph.training.trainer import Trainer, TrainerConfig
from mtlgraph.training.unfreezing import GradualUnfreezing
from mtlgraph.training.writers import WRITERS, Writer

__all__ = [
    "HOOKS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "WRITERS",
    "DistEnv",
    "EarlyStopping",
    "Every",
    "GradualUnfreezing",
    "Hook",
    "LossRecord",
    "Run",
    "RunState",
    "Trainer",
    "TrainerConfig",
    "Writer",
    "load_checkpoint",
    "resolve_checkpoint",
    "run_directory",
]
