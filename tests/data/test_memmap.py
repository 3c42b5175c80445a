"""Memory-mapped fields and labels: batches read only their rows, equal to in-memory data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlgraph import DataError, DictDataLoader, DictDataset
from mtlgraph.data.memmap import PageBudget, gather


def _maps(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.memmap, np.memmap]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return (
        x,
        y,
        np.load(tmp_path / "x.npy", mmap_mode="r"),
        np.load(tmp_path / "y.npy", mmap_mode="r"),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_memmapped_batches_equal_in_memory_batches(tmp_path: Path, workers: int) -> None:
    x, y, xm, ym = _maps(tmp_path)
    mapped = DictDataset("d", "train", {"x": xm}, {"t": ym})
    memory = DictDataset("d", "train", {"x": x}, {"t": y})
    assert mapped.X_dict["x"] is xm  # kept mapped, not read
    for shuffle in (False, True):
        a = DictDataLoader(mapped, batch_size=8, shuffle=shuffle, seed=1, num_workers=workers)
        b = DictDataLoader(memory, batch_size=8, shuffle=shuffle, seed=1)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa["x"], xb["x"]) and torch.equal(ya["t"], yb["t"])


def test_gather_reads_sorted_and_restores_the_batch_order() -> None:
    arr = np.arange(20).reshape(10, 2)
    assert gather(arr, torch.tensor([9, 0, 4])).tolist() == [[18, 19], [0, 1], [8, 9]]
    assert gather(arr, slice(2, 4)).tolist() == [[4, 5], [6, 7]]


def test_page_budget_releases_after_the_budget(tmp_path: Path) -> None:
    _, _, xm, _ = _maps(tmp_path)
    budget = PageBudget(budget=100)
    budget.account(xm, 60)
    assert budget.read[id(xm._mmap)] == 60
    budget.account(xm, 60)  # over budget: released (madvise), counter reset
    assert budget.read[id(xm._mmap)] == 0


def test_a_scalar_memmap_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.float32(1.0))
    scalar = np.load(tmp_path / "s.npy", mmap_mode="r")
    with pytest.raises(DataError, match=r"X_dict\['s'\] is a scalar"):
        DictDataset("d", "train", {"s": scalar, "x": np.zeros((2, 1))}, {})


def test_yaml_npy_directory_is_memory_mapped_with_per_dataset_loading(tmp_path: Path) -> None:
    from experiment_helpers import tiny_config, write_config

    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("valid", 40)):
        d = tmp_path / "circles_npy" / split
        d.mkdir(parents=True)
        x = rng.normal(size=(n, 2)).astype(np.float32)
        np.save(d / "features.npy", x)
        np.save(d / "label.npy", (x[:, 0] ** 2 + x[:, 1] ** 2 < 1).astype(np.int64))
    cfg = tiny_config(batch_scheduler={"name": "temperature", "temperature": 2.0})
    cfg["trainer"]["steps_per_epoch"] = 9
    cfg["data"]["num_workers"] = 0
    cfg["data"]["datasets"]["circles"] = {
        "path": {"train": "circles_npy/train", "valid": "circles_npy/valid"},
        "format": "npy",
        "fields": {"xy": "features"},
        "labels": {"circle_task": "label"},
        "batch_size": 8,
        "num_workers": 2,
    }
    exp = build_experiment(load_config(write_config(tmp_path / "c.yaml", cfg)))
    loaders = {(dl.dataset.name, dl.dataset.split): dl for dl in exp.loaders}
    circles = loaders[("circles", "train")]
    assert isinstance(circles.dataset.X_dict["xy"], np.memmap)
    assert (circles.batch_size, circles.num_workers) == (8, 2)
    assert loaders[("squares", "train")].num_workers == 0
    exp.trainer.fit(exp.model, exp.loaders)
    assert exp.trainer.global_step == 2 * 9
    assert "circle_task/circles/valid/accuracy" in exp.trainer.history[-1]

    np.save(tmp_path / "circles_npy" / "train" / "features.npy", np.zeros((120, 2)))
    with pytest.raises(DataError, match="memory-mapped array is float64; .* save it as float32"):
        build_experiment(load_config(tmp_path / "c.yaml"))
