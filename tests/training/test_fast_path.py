"""The step's shortcuts change no value beyond float rounding: the fused (or multi-tensor)
optimizer update on the CPU, labels known to need no mask, batches known to be on the device;
a fit equals a hand-written loop with the same optimizer kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.training.setup import CPU_UPDATE, batch_sources, prefer_fast_update


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(7, 5, generator=g)), nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.Adam, {"lr": 0.02}),
        (torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.1, "amsgrad": True}),
        (torch.optim.Adam, {"lr": 0.02, "maximize": True}),
        (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.02, "amsgrad": True}),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
        (torch.optim.SGD, {"lr": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    ],
)
def test_the_cpu_update_equals_the_per_parameter_loop(cls: type, kwargs: dict) -> None:
    mode = CPU_UPDATE[cls]
    results = []
    for fast in (None, True):
        params = _params()
        opt = cls(params, **{mode: fast}, **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(2000):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        if mode == "foreach":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_prefer_fast_update_sets_only_groups_that_left_it_unset() -> None:
    a, b = _params()
    c, d = _params()
    complex_param = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = torch.optim.Adam(
        [
            {"params": [a]},
            {"params": [b], "fused": False},
            {"params": [c], "foreach": True},
            {"params": [d, complex_param]},
        ],
        lr=0.1,
    )
    prefer_fast_update(opt)
    assert [g["fused"] for g in opt.param_groups] == [True, False, None, None]
    sgd = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    prefer_fast_update(sgd)
    assert (sgd.param_groups[0]["foreach"], sgd.param_groups[0]["fused"]) == (True, None)
    other = torch.optim.RMSprop([a], lr=0.1)
    prefer_fast_update(other)
    assert other.param_groups[0]["foreach"] is None
    differentiable = torch.optim.SGD([a], lr=0.1, differentiable=True)
    prefer_fast_update(differentiable)
    assert differentiable.param_groups[0]["foreach"] is None


def _model(seed: int = 0) -> MultitaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    return MultitaskClassifier(
        [
            Task(
                t,
                {"trunk": trunk, f"{t}_head": nn.Linear(8, 2)},
                [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            )
            for t in ("a", "b")
        ]
    )


def _datasets() -> list[DictDataset]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, generator=g)
    y = (x[:, 0] > 0).long()
    partial = y.clone()
    partial[::3] = -1  # task b's labels: a third ignored
    return [
        DictDataset("da", "train", {"x": x}, {"a": y}),
        DictDataset("db", "train", {"x": x}, {"b": partial, "a": y}),
    ]


def test_batch_sources_know_which_labels_need_no_mask() -> None:
    model = _model()
    loaders = [DictDataLoader(ds, batch_size=8) for ds in _datasets()]
    sources = batch_sources(model, loaders, torch.device("cpu"))
    assert [s.dataset for s in sources] == ["da", "db"]
    assert [sorted(s.all_active) for s in sources] == [["a"], ["a"]]  # b has ignored labels
    assert all(s.on_device for s in sources)


def test_calculate_loss_with_all_active_equals_the_masked_computation() -> None:
    model = _model()
    X, Y = _datasets()[1].batch(slice(0, 12))
    plain = model.calculate_loss(X, Y)
    told = model.calculate_loss(X, Y, all_active={"a"})
    assert plain[1] == told[1] == {"b": 8, "a": 12}
    assert all(torch.equal(plain[0][t], told[0][t]) for t in ("a", "b"))


def test_a_fit_equals_a_hand_written_loop_with_ignored_labels() -> None:
    """Sequential batches, loader by loader (the ``mixed`` default alternates them per its plan;
    one loader keeps the order plain), ignored labels masked, Adam on the CPU (its fused update,
    the one mtlgraph picks there)."""
    datasets = _datasets()
    model = _model()
    reference = copy.deepcopy(model)
    loader = DictDataLoader(datasets[1], batch_size=8)
    Trainer(n_epochs=3, lr=0.05, progress_bar=False).fit(model, [loader])
    pool = reference.module_pool
    opt = torch.optim.Adam(
        [p for m in ("trunk", "b_head", "a_head") for p in pool[m].parameters()],
        lr=0.05,
        fused=True,
    )
    x, yb, ya = datasets[1].X_dict["x"], datasets[1].Y_dict["b"], datasets[1].Y_dict["a"]
    for _ in range(3):
        for s in range(0, 40, 8):
            h = pool["trunk"](x[s : s + 8])
            keep = yb[s : s + 8] != -1
            loss_b = F.cross_entropy(pool["b_head"](h)[keep], yb[s : s + 8][keep])
            loss_a = F.cross_entropy(pool["a_head"](h), ya[s : s + 8])
            (loss_b + loss_a).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for m in ("trunk", "a_head", "b_head"):
        for p, q in zip(model.module_pool[m].parameters(), pool[m].parameters(), strict=True):
            assert torch.equal(p, q), m
