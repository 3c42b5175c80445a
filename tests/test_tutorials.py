"""The tutorials run in the suite with their outcomes asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_01_mtl_basics() -> None:
    model, scores = load("01_mtl_basics").main(N=1000, n_epochs=10)
    assert len(model.tasks) == 3
    assert len(model.module_pool) == 4  # 1 shared module plus 3 separate task heads
    expected = {
        f"{task}/{ds}/{split}/accuracy"
        for task, ds in (
            ("circle_task", "circleDataset"),
            ("square_task", "squareDataset"),
            ("inv_circle_task", "InvCircleDataset"),
        )
        for split in ("train", "valid", "test")
    }
    assert set(scores) == expected
    for key in expected:
        if "/test/" in key:
            assert scores[key] >= 0.9, (key, scores[key])
