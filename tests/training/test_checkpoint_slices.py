"""A slice score key (``task/<dataset>:<slice>/split/metric``) can select ``best.pt`` when
``TrainerConfig.slices`` names the slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import ConfigError, MultitaskClassifier, Trainer
from mtlgraph.graph.slices import SLICES
from mtlgraph.training.checkpoint import load_checkpoint


def _setup() -> tuple[MultitaskClassifier, list[object]]:
    torch.manual_seed(0)
    model = MultitaskClassifier([make_task("t", nn.Sequential(nn.Linear(2, 4), nn.ReLU()))])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    return model, [
        make_loader("pts", "train", {"x": x}, {"t": y}, 16),
        make_loader("pts", "valid", {"x": x[:32]}, {"t": y[:32]}, 16),
    ]


def test_a_slice_key_selects_the_best_checkpoint(tmp_path: Path) -> None:
    key = "t/pts:right_ck/valid/accuracy"
    SLICES.register("right_ck", lambda X: X["x"][:, 1] > 0)
    try:
        model, loaders = _setup()
        trainer = Trainer(
            n_epochs=3,
            progress_bar=False,
            slices=["right_ck"],
            run_dir=str(tmp_path / "run"),
            checkpoint_metric=key,
        )
        trainer.fit(model, loaders)
        model, loaders = _setup()
        with pytest.raises(ConfigError) as info:  # the slice is not scored without slices=
            Trainer(
                n_epochs=1,
                progress_bar=False,
                run_dir=str(tmp_path / "other"),
                checkpoint_metric=key,
            ).fit(model, loaders)
    finally:
        SLICES.unregister("right_ck")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    values = [record[key] for record in trainer.history if key in record]
    assert len(values) == 3
    assert best["run"]["progress"]["epoch"] == 1 + values.index(max(values))
    assert f"checkpoint_metric: '{key}' is not a key this training logs" in str(info.value)
