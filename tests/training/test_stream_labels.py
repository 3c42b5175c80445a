"""Labels of streams and map-style NamedDatasets are checked per batch: in training
before the batch's step, and in predict / score; good data trains bit-identically."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import mtlgraph.training.labels as labels_module
import mtlgraph.training.trainer as trainer_module
from mtlgraph import (
    DataError,
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    NamedDataset,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.data.streams import ExampleStream
from mtlgraph.training.labels import BatchLabelCheck

N = 24


def _example(i: int, bad: int | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    x = torch.tensor([float(np.sin(1.7 * i)), float(np.cos(0.9 * i))])
    label = 5 if i == bad else int(x[0] > 0)
    return {"x": x}, {"a": torch.tensor(label)}


class Stream(ExampleStream):
    """One unit of ``N`` examples in order; example ``bad`` has label 5 (task ``a`` has 2)."""

    labels = ("a",)

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad

    def num_units(self) -> int:
        return 1

    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[Any]:
        for i in range(start, N):
            yield _example(i, self.bad)

    def num_examples(self) -> int:
        return N


class MapStyle(Dataset):
    """The same examples as a map-style dataset."""

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return _example(i, self.bad)


class Counter(nn.Module):
    """Identity that counts its training-mode calls (one per training step's forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += int(self.training)
        return x


def _model() -> tuple[MultitaskClassifier, Counter]:
    torch.manual_seed(0)
    counter = Counter()
    modules = {"trunk": nn.Linear(2, 8), "count": counter, "head": nn.Linear(8, 2)}
    ops = [
        Operation("trunk", [("_input_", "x")]),
        Operation("count", ["trunk"]),
        Operation("head", ["count"]),
    ]
    return MultitaskClassifier([Task("a", modules, ops)]), counter


CONFIG: dict[str, Any] = {
    "n_epochs": 2,
    "lr": 0.1,
    "progress_bar": False,
    "batch_scheduler": "uniform",
    "steps_per_epoch": 6,
}


def _stream_loader(bad: int | None = None, split: str = "train") -> DictDataLoader:
    return DictDataLoader(NamedDataset("s", split, Stream(bad)), batch_size=4, shuffle=False)


def test_a_bad_label_in_a_stream_raises_before_the_step_of_its_batch() -> None:
    model, counter = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _stream_loader(bad=9)  # batch 2 holds examples 8..11: row 1
    with pytest.raises(DataError) as info:
        Trainer(**CONFIG).fit(model, [loader])
    message = str(info.value)
    assert (
        "dataset 's' (train), batch 2 (from example 8), task 'a': label 5 (row 1) is outside "
        "0..1: the head outputs 2 classes" in message
    )
    assert counter.calls == 2  # batches 0 and 1 trained; batch 2 never reached the model
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the two good steps did train


def test_a_bad_label_in_a_map_style_named_dataset_raises_in_training() -> None:
    model, counter = _model()
    loader = DictDataLoader(NamedDataset("m", "train", MapStyle(bad=13)), batch_size=4)
    with pytest.raises(
        DataError,
        match=r"dataset 'm' \(train\), batch 3 \(from example 12\), "
        r"task 'a': label 5 \(row 1\) is outside 0\.\.1",
    ):
        Trainer(**CONFIG).fit(model, [loader])
    assert counter.calls == 3


def _params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class _NoCheck:
    """The loop without the per-batch check."""

    def __init__(self, model: Any, loaders: Any) -> None:
        self.checked = [False] * len(loaders)

    def __call__(self, i: int, batch: Any) -> None:
        pass


def test_a_good_stream_trains_bit_identically_and_computes_head_widths_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = {**CONFIG, "eval_splits": ["valid"], "evaluation_freq": 1}
    model, _ = _model()
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "BatchLabelCheck", _NoCheck)
        unchecked = Trainer(**config)
        unchecked.fit(model, [_stream_loader(), _stream_loader(split="valid")])
    expected = _params(model)

    calls: list[list[str]] = []
    widths = labels_module.head_widths

    def counting(model: Any, X: Any, names: Any) -> Any:
        calls.append(list(names))
        return widths(model, X, names)

    monkeypatch.setattr(labels_module, "head_widths", counting)
    model, counter = _model()
    checked = Trainer(**config)
    checked.fit(model, [_stream_loader(), _stream_loader(split="valid")])
    got = _params(model)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert checked.history == unchecked.history
    assert counter.calls == 12 and calls == [["a"]]  # one forward pass for the widths, ever


def test_in_memory_loaders_are_left_to_the_check_at_fit_start() -> None:
    model, _ = _model()
    ds = DictDataset("d", "train", {"x": torch.zeros(3, 2)}, {"a": torch.tensor([0, 1, 7])})
    check = BatchLabelCheck(model, [DictDataLoader(ds), _stream_loader()])
    assert check.checked == [False, True]
    check(0, ({"x": torch.zeros(3, 2)}, {"a": torch.tensor([0, 1, 7])}))  # not checked here
    with pytest.raises(DataError, match=r"dataset 'd' \(train\), task 'a': label 7 \(row 2\)"):
        Trainer(n_epochs=1, progress_bar=False).fit(model, [DictDataLoader(ds)])


def test_score_and_predict_check_the_labels_of_a_stream() -> None:
    model, _ = _model()
    with pytest.raises(DataError) as info:
        model.score(_stream_loader(bad=22, split="valid"))
    assert (
        "dataset 's' (valid), batch 5 (from example 20), task 'a': label 5 (row 2) is outside "
        "0..1" in str(info.value)
    )
    with pytest.raises(DataError, match=r"dataset 's' \(valid\), batch 0 \(from example 0\)"):
        model.predict(_stream_loader(bad=0, split="valid"))
    result = model.predict(_stream_loader(split="valid"))
    assert result["golds"]["a"].shape == (N,)
    scores = model.score(_stream_loader(split="valid"))
    assert set(scores) == {"a/s/valid/accuracy"}
