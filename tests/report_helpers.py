"""Runs and configs for the report and sweep tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from experiment_helpers import TINY, write_config

from mtlgraph.experiment.cli import main

GATED: dict[str, Any] = {
    "experiment": "gated",
    "seed": 0,
    "modules": {
        "experts": {"type": "mmoe_experts", "in_dim": 8, "n_experts": 3, "hidden": [4]},
        "y0_gate": {"type": "mmoe_gate", "in_dim": 8, "n_experts": 3},
        "y1_gate": {"type": "mmoe_gate", "in_dim": 8, "n_experts": 3},
        "y0_head": {"type": "linear", "in_features": 4, "out_features": 2},
        "y1_head": {"type": "linear", "in_features": 4, "out_features": 2},
    },
    "tasks": {
        t: {
            "ops": [
                {"module": "experts", "inputs": [["_input_", "x"]]},
                {"module": f"{t}_gate", "inputs": [["_input_", "x"], "experts"]},
                {"module": f"{t}_head", "inputs": [f"{t}_gate"]},
            ]
        }
        for t in ("y0", "y1")
    },
    "data": {
        "batch_size": 32,
        "datasets": {
            "subsets": {
                "source": {
                    "type": "generator",
                    "name": "feature_subsets",
                    "args": {"n": 200, "n_tasks": 2, "seed": 0},
                },
                "fields": {"x": "x"},
                "labels": {"y0": "y0", "y1": "y1"},
            }
        },
    },
    "trainer": {
        "n_epochs": 2,
        "lr": 0.05,
        "progress_bar": False,
        "checkpoint_metric": "y0/subsets/valid/accuracy",
        "diagnostics": {"every": 2},
        "evaluation_freq": 3,
        "evaluation_unit": "steps",
    },
}
"""MMoE with 3 experts, interference probes every 2 steps and evaluations every 3 steps."""


def train_gated(root: Path) -> Path:
    """A finished run directory of :data:`GATED` under ``root`` (with TensorBoard events)."""
    config = write_config(root / "gated.yaml", copy.deepcopy(GATED))
    run = root / "run"
    assert main(["train", str(config), f"trainer.run_dir={run}", "--quiet"]) == 0
    return run


def write_tiny(root: Path) -> Path:
    """:data:`TINY` (two tasks sharing a trunk, 10 steps an epoch) as ``root/tiny.yaml``."""
    return write_config(root / "tiny.yaml", copy.deepcopy(TINY))
