"""Soft (probabilistic) labels: the loss, metrics against the argmax, masking, checks, balancers,
resume and YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Interrupt, make_loader
from experiment_helpers import tiny_config, write_config
from sklearn.metrics import accuracy_score
from torch import nn

from mtlgraph import DataError, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config
from mtlgraph.graph.losses import LOSSES, cross_entropy_with_probs
from mtlgraph.graph.soft_labels import hard_targets, is_soft_label, soft_label_problems
from mtlgraph.training.checkpoint import load_checkpoint


def _soft(x: torch.Tensor, confidence: float = 0.8) -> torch.Tensor:
    """Probabilities of ``x0 > 0``: ``confidence`` on the true class."""
    pos = (x[:, 0] > 0).float()
    p1 = pos * confidence + (1 - pos) * (1 - confidence)
    return torch.stack([1 - p1, p1], dim=1)


def _task(name: str = "t", trunk: nn.Module | None = None, out: int = 2, **kw: object) -> Task:
    trunk = trunk if trunk is not None else nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    return Task(
        name,
        {"trunk": trunk, f"{name}_head": nn.Linear(8, out)},
        [Operation("trunk", [("_input_", "x")]), Operation(f"{name}_head", ["trunk"])],
        **kw,  # type: ignore[arg-type]
    )


def _data(n: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the loss


def test_cross_entropy_with_probs_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    target = torch.softmax(torch.randn(6, 3, generator=g), dim=1)
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    one_hot = F.one_hot(ids, 3).float()
    assert torch.allclose(cross_entropy_with_probs(logits, one_hot), F.cross_entropy(logits, ids))
    assert torch.allclose(cross_entropy_with_probs(logits, target), F.cross_entropy(logits, target))
    per_row = cross_entropy_with_probs(logits, target, reduction="none")
    assert per_row.shape == (6,)
    assert torch.allclose(cross_entropy_with_probs(logits, target, reduction="sum"), per_row.sum())
    w = torch.tensor([1.0, 2.0, 0.5])
    manual = -(target * w * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(cross_entropy_with_probs(logits, target, weight=w), manual)
    assert LOSSES.get("cross_entropy_with_probs") is cross_entropy_with_probs
    with pytest.raises(DataError, match=r"soft labels of shape \(6, 2\) for outputs of shape"):
        cross_entropy_with_probs(logits, target[:, :2])
    with pytest.raises(ValueError, match="reduction must be"):
        cross_entropy_with_probs(logits, target, reduction="avg")


def test_soft_labels_train_and_score_against_the_argmax_with_ignored_rows() -> None:
    torch.manual_seed(0)
    task = _task()
    model = MultitaskClassifier([task])
    x = _data()
    soft = _soft(x)
    soft[:10] = -1  # ignored rows: masked out of the loss and the metrics
    loss, count = model.calculate_loss({"x": x}, {"t": soft})
    out = model.forward({"x": x[10:]}, ["t"])["t_head"]
    assert count == {"t": 150}
    assert torch.allclose(loss["t"], F.cross_entropy(out, soft[10:]))
    train = make_loader("d", "train", {"x": x}, {"t": soft}, 16, shuffle=True)
    Trainer(n_epochs=8, lr=0.05, progress_bar=False).fit(model, [train])
    train = make_loader("d", "train", {"x": x}, {"t": soft}, 64)  # in row order
    scores = model.score(train)
    result = model.predict(train, return_preds=True)
    gold = soft[10:].argmax(1).numpy()
    expected = accuracy_score(gold, result["preds"]["t"][10:])
    assert scores == {"t/d/train/accuracy": pytest.approx(expected)}
    assert expected > 0.9


def test_binary_probabilities_for_a_one_logit_head() -> None:
    torch.manual_seed(0)
    model = MultitaskClassifier([_task(out=1, task_type="binary")])
    x = _data()
    p = _soft(x)[:, 1]
    loss, _ = model.calculate_loss({"x": x}, {"t": p})
    out = model.forward({"x": x}, ["t"])["t_head"].squeeze(1)
    assert torch.allclose(loss["t"], F.binary_cross_entropy_with_logits(out, p))
    train = make_loader("d", "train", {"x": x}, {"t": p}, 16, shuffle=True)
    Trainer(n_epochs=8, lr=0.05, progress_bar=False).fit(model, [train])
    train = make_loader("d", "train", {"x": x}, {"t": p}, 64)  # in row order
    preds = model.predict(train, return_preds=True)["preds"]["t"]
    expected = accuracy_score((p > 0.5).long().numpy(), preds)
    assert model.score(train)["t/d/train/accuracy"] == pytest.approx(expected) and expected > 0.9


def test_ties_go_to_the_lowest_class() -> None:
    multi, binary = _task(), _task(out=1, task_type="binary")
    golds = np.array([[0.5, 0.5], [0.2, 0.8], [-1.0, -1.0]])
    assert hard_targets(golds, multi).tolist() == [0, 1, -1]
    assert hard_targets(np.array([0.5, 0.51, -1.0]), binary).tolist() == [0, 1, -1]
    assert is_soft_label(torch.tensor([[0.5, 0.5]]), multi)
    assert not is_soft_label(torch.tensor([0, 1]), multi)
    assert not is_soft_label(torch.tensor([0.0, 1.0]), multi)  # (N,) floats: class ids
    assert is_soft_label(torch.tensor([0.3, 1.0]), binary)


# ---------------------------------------------------------------- bad input


def test_bad_soft_labels_are_named_before_any_step() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    model = MultitaskClassifier([_task("t", trunk), _task("u", trunk, out=1, task_type="binary")])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _data(20)
    rows = _soft(x)
    rows[3] = torch.tensor([0.6, 0.6])
    nan = _soft(x)
    nan[5, 0] = float("nan")
    negative = _soft(x)
    negative[7] = torch.tensor([1.2, -0.2])
    wide = torch.full((20, 3), 1 / 3)
    loaders = [
        make_loader("sums", "train", {"x": x}, {"t": rows}),
        make_loader("nans", "train", {"x": x}, {"t": nan}),
        make_loader("neg", "train", {"x": x}, {"t": negative}),
        make_loader("wide", "train", {"x": x}, {"t": wide}),
        make_loader("two", "train", {"x": x}, {"u": _soft(x)}),
    ]
    with pytest.raises(DataError) as info:
        Trainer(progress_bar=False).fit(model, loaders)
    problems = info.value.problems
    assert problems == [
        "dataset 'sums' (train), task 't': soft label row 3 sums to 1.2, not 1 (tolerance "
        "0.001): [0.6, 0.6]; normalise the rows: labels / labels.sum(1, keepdims=True)",
        "dataset 'nans' (train), task 't': soft label row 5 holds NaN probabilities: [nan, 0.8]",
        "dataset 'neg' (train), task 't': soft label row 7 holds a negative probability: "
        "[1.2, -0.2]",
        "dataset 'neg' (train), task 't': soft label row 7 holds a probability above 1: "
        "[1.2, -0.2]",
        "dataset 'wide' (train), task 't': soft labels have 3 columns, the head outputs 2 "
        "classes; give one probability per class",
        "dataset 'two' (train), task 'u': a binary task takes soft labels as (N,) probabilities "
        "of the positive class (one logit per row), got shape (20, 2); pass labels[:, 1], or "
        "make the task multiclass with a 2-unit head",
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert soft_label_problems(torch.tensor([[-1.0, -1.0]]), _task(), "x") == []  # ignored row


# ---------------------------------------------------------------- balancers, resume, YAML


@pytest.mark.parametrize("balancer", ["pcgrad", "uncertainty"])
def test_soft_labels_with_balancers(balancer: str) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    model = MultitaskClassifier([_task("a", trunk), _task("b", trunk)])
    x = _data()
    yb = (x[:, 1] > 0).long()
    loaders = [
        make_loader("A", "train", {"x": x}, {"a": _soft(x), "b": yb}, 16, shuffle=True),
        make_loader("A", "valid", {"x": x}, {"a": _soft(x), "b": yb}, 64),
    ]
    trainer = Trainer(n_epochs=8, lr=0.05, balancer=balancer, progress_bar=False)
    trainer.fit(model, loaders)
    final = trainer.history[-1]
    assert final["a/A/valid/accuracy"] > 0.9 and final["b/A/valid/accuracy"] > 0.9


def _resume_setup(at: int = 0) -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.3))
    task = Task(
        "t",
        {"trunk": trunk, "stop": Interrupt(at), "head": nn.Linear(8, 2)},
        [
            Operation("trunk", [("_input_", "x")]),
            Operation("stop", ["trunk"]),
            Operation("head", ["stop"]),
        ],
    )
    x = _data()
    loaders = [
        make_loader("d", "train", {"x": x}, {"t": _soft(x, 0.7)}, 16, shuffle=True, seed=3),
        make_loader("d", "valid", {"x": x[:48]}, {"t": _soft(x[:48], 0.7)}, 16),
    ]
    return MultitaskClassifier([task]), loaders


def test_resume_with_soft_labels_is_bit_identical(tmp_path: Path) -> None:
    cfg = {"n_epochs": 2, "lr": 0.02, "progress_bar": False, "checkpoint_every": 4}
    cfg.update(checkpoint_unit="steps", evaluation_unit="steps", evaluation_freq=5)
    model, loaders = _resume_setup()
    reference = Trainer(run_dir=str(tmp_path / "ref"), **cfg)
    reference.fit(model, loaders)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model, loaders = _resume_setup(at=15)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **cfg).fit(model, loaders)
    assert load_checkpoint(tmp_path / "run")["run"]["progress"]["global_step"] == 12
    model, loaders = _resume_setup()
    resumed = Trainer(run_dir=str(tmp_path / "run"), **cfg)
    resumed.fit(model, loaders, resume_from=tmp_path / "run")
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert resumed.history == reference.history


def _soft_yaml(tmp_path: Path, soft: np.ndarray) -> Path:
    g = np.random.default_rng(0)
    x = g.uniform(-1.5, 1.5, size=(len(soft), 2))
    np.savez(tmp_path / "weak.npz", x=x, probs=soft)
    cfg = tiny_config(n_epochs=1)
    cfg["data"]["datasets"] = {
        "weak": {
            "source": {
                "type": "table",
                "path": "weak.npz",
                "fractions": {"train": 0.8, "valid": 0.2},
            },
            "fields": {"xy": "x"},
            "labels": {"circle_task": "probs"},
        }
    }
    return write_config(tmp_path / "c.yaml", cfg)


def test_yaml_float_label_matrix_is_soft(tmp_path: Path) -> None:
    g = np.random.default_rng(1)
    p = g.uniform(0, 1, size=40)
    exp = build_experiment(load_config(_soft_yaml(tmp_path, np.stack([1 - p, p], 1))))
    labels = exp.datasets[0].Y_dict["circle_task"]
    assert labels.dtype == torch.float32 and labels.shape == (32, 2)
    exp.trainer.fit(exp.model, exp.loaders)
    assert "circle_task/weak/valid/accuracy" in exp.trainer.history[-1]
    bad = np.stack([1 - p, p], 1)
    bad[4] = [0.9, 0.9]
    with pytest.raises(DataError, match=r"task 'circle_task': soft label row 4 sums to 1.8"):
        build_experiment(load_config(_soft_yaml(tmp_path, bad)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soft_labels_and_slices_under_ddp() -> None:
    """Two gloo ranks train on soft labels with a gradient balancer; the gathered evaluation
    (slices included) equals a single-process score of the same weights, on both ranks."""
    import multiprocessing as mp
    import socket

    from soft_ddp_workers import soft_ddp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=soft_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, history0, local0), (_, history1, _) = results
    assert history0 == history1
    for key in ("t/d/valid/accuracy", "t/d:right_ddp/valid/accuracy"):
        assert history0[key] == pytest.approx(local0[key]), key
    assert history0["t/d/valid/accuracy"] > 0.8
