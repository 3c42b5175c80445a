"""The tutorials run in the suite with their outcomes asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

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


def test_02_multi_dataset_ensembles() -> None:
    """A conflicting task on the shared image trunk hurts the digit task; the diagnostics show
    it and suggest a separate trunk; with its own trunk the digit task recovers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: faster and steadier on one thread
    try:
        result = load("02_multi_dataset_ensembles").main(verbose=False)
    finally:
        torch.set_num_threads(threads)
    baseline, shared, separate = result["baseline"], result["shared"], result["separate"]
    assert baseline >= 0.85
    assert shared <= baseline - 0.3  # destructive interference
    assert separate >= baseline - 0.04  # recovered with a second image trunk
    step2 = result["reports"]["2 digit + loop, shared image trunk"]
    assert step2.grouping == (("digit_task", "loop_task"),)  # related tasks: keep sharing
    report = result["reports"]["3 + price on the shared image trunk"]
    pair = report.pair("digit_task", "price_task", "image_trunk")
    assert pair is not None
    assert pair.mean_cosine < 0  # the price gradients point against the digit's, on average
    assert pair.norm_ratio < 0.05  # and are over 20x larger: price dominates the trunk
    assert report.affinity_of("price_task", "digit_task") < 0  # a price step hurts the digit
    value, error = report.mutual("digit_task", "price_task")
    assert value + 2 * error < 0
    assert report.grouping == (("digit_task", "loop_task"), ("price_task",))
