"""Small experiment configs for the config, build, CLI, checkpoint and writer tests."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "experiment": "tiny",
    "seed": 0,
    "modules": {
        "trunk": {"type": "mlp", "in_dim": 2, "hidden": [8]},
        "circle_head": {"type": "linear", "in_features": 8, "out_features": 2},
        "square_head": {"type": "linear", "in_features": 8, "out_features": 2},
    },
    "tasks": {
        "circle_task": {
            "ops": [
                {"module": "trunk", "inputs": [["_input_", "xy"]]},
                {"module": "circle_head", "inputs": ["trunk"]},
            ]
        },
        "square_task": {
            "ops": [
                {"module": "trunk", "inputs": [["_input_", "xy"]]},
                {"module": "square_head", "inputs": ["trunk"]},
            ]
        },
    },
    "data": {
        "batch_size": 16,
        "datasets": {
            "circles": {
                "source": {"type": "generator", "name": "circle", "args": {"n": 200, "seed": 0}},
                "fields": {"xy": "x"},
                "labels": {"circle_task": "y"},
            },
            "squares": {
                "source": {"type": "generator", "name": "square", "args": {"n": 200, "seed": 0}},
                "fields": {"xy": "x"},
                "labels": {"square_task": "y"},
            },
        },
    },
    "trainer": {"n_epochs": 2, "lr": 0.05, "progress_bar": False},
}
"""Two tasks sharing a trunk, two generated datasets of 160/20/20 rows: 10 steps per epoch."""


def tiny_config(**trainer: Any) -> dict[str, Any]:
    """A deep copy of :data:`TINY` with trainer settings changed."""
    cfg = copy.deepcopy(TINY)
    cfg["trainer"].update(trainer)
    return cfg


def write_config(path: Path, data: dict[str, Any] | str) -> Path:
    """Write a config (a mapping, or YAML text) to ``path``."""
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    """Environment for ``python -m mtlgraph`` subprocesses: this checkout's mtlgraph, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m mtlgraph ARGS`` with the running interpreter."""
    return [sys.executable, "-m", "mtlgraph", *args]
