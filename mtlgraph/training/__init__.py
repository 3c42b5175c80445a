"""Training: the loop, its config, LR schedules, the step, optimizer set-up, checkpoints,
writers and distributed helpers.
"""

from mtlgraph.training.trainer import Trainer, TrainerConfig

__all__ = ["Trainer", "TrainerConfig"]
