"""Checkpoints: contents, weights_only safety, atomic writes under SIGKILL, exact resume."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Interrupt, make_loader
from experiment_helpers import cli_env
from torch import nn

from mtlgraph import CheckpointError, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.graph.model_file import FORMAT
from mtlgraph.training.checkpoint import (
    Checkpointer,
    check_plain,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def _setup(at: int = 0, block: int = 1) -> tuple[MultitaskClassifier, list]:
    """Two tasks, a dropout trunk, shuffled loaders of 10 and 7 batches (``block``: the
    training loaders' ``shuffle_block``)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.3))
    stop = Interrupt(at)
    tasks = [
        Task(
            t,
            {"trunk": trunk, "stop": stop, f"{t}_head": nn.Linear(8, 2)},
            [
                Operation("trunk", [("_input_", "x")]),
                Operation("stop", ["trunk"]),
                Operation(f"{t}_head", ["stop"]),
            ],
        )
        for t in ("a", "b")
    ]
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(160, 2, generator=g), torch.randn(112, 2, generator=g)
    loaders = [
        make_loader(
            "da",
            "train",
            {"x": xa},
            {"a": (xa[:, 0] > 0).long()},
            16,
            shuffle=True,
            seed=5,
            shuffle_block=block,
        ),
        make_loader(
            "db",
            "train",
            {"x": xb},
            {"b": (xb[:, 1] > 0).long()},
            16,
            shuffle=True,
            seed=6,
            shuffle_block=block,
        ),
        make_loader("da", "valid", {"x": xa[:48]}, {"a": (xa[:48, 0] > 0).long()}, 16),
    ]
    return MultitaskClassifier(tasks), loaders


CONFIG = {
    "n_epochs": 3,
    "lr": 0.02,
    "progress_bar": False,
    "batch_scheduler": "shuffled",
    "lr_scheduler": "cosine",
    "warmup_steps": 4,
    "evaluation_unit": "steps",
    "evaluation_freq": 5,
    "checkpoint_every": 3,
    "checkpoint_unit": "steps",
    "checkpoint_metric": "a/da/valid/accuracy",
}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("interrupt_at", "block"),
    [(23, 1), (34, 1), (40, 1), (23, 5)],  # mid-epoch; in epoch 2 after an epoch end; blocks
)
def test_resume_mid_epoch_is_bit_identical(tmp_path: Path, interrupt_at: int, block: int) -> None:
    model, loaders = _setup(block=block)
    reference = Trainer(run_dir=str(tmp_path / "ref"), **CONFIG)
    reference.fit(model, loaders)
    expected = _params(model)

    model, loaders = _setup(at=interrupt_at, block=block)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **CONFIG).fit(model, loaders)
    state = load_checkpoint(tmp_path / "run")
    progress = state["run"]["progress"]
    assert progress["global_step"] == 3 * ((interrupt_at - 1) // 3)  # the last multiple of 3
    assert 0 < progress["step_in_epoch"] < 17  # mid-epoch
    assert sum(progress["loader_positions"]) == progress["step_in_epoch"]

    model, loaders = _setup(block=block)
    resumed = Trainer(run_dir=str(tmp_path / "run"), **CONFIG)
    resumed.fit(model, loaders, resume_from=tmp_path / "run")
    got = _params(model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.history == reference.history
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text()
    ref_opt = reference.optimizer.state_dict()["state"]
    got_opt = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_opt[i]["exp_avg"], got_opt[i]["exp_avg"]) for i in ref_opt)
    best_ref = torch.load(tmp_path / "ref" / "checkpoints" / "best.pt", weights_only=True)
    best_got = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best_ref["hooks"] == best_got["hooks"]


def test_resume_with_the_mixed_scheduler_cycling_loaders(tmp_path: Path) -> None:
    cfg = {**CONFIG, "batch_scheduler": "mixed", "checkpoint_every": 4}
    model, loaders = _setup()
    Trainer(run_dir=str(tmp_path / "ref"), **cfg).fit(model, loaders)
    expected = _params(model)
    model, loaders = _setup(at=2 * 12)  # 2 calls per step: stop in step 12 of 30
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **cfg).fit(model, loaders)
    assert load_checkpoint(tmp_path / "run")["run"]["progress"]["loader_positions"] == [8, 8]
    model, loaders = _setup()
    Trainer(run_dir=str(tmp_path / "run"), **cfg).fit(model, loaders, resume_from=tmp_path / "run")
    assert all(torch.equal(expected[k], v) for k, v in _params(model).items())


@pytest.mark.parametrize(
    "extra",
    [
        {"balancer": "uncertainty"},
        {"balancer": "dwa"},
        {"balancer": {"name": "pcgrad", "seed": 3}},
        {"balancer": "gradnorm"},
        {"balancer": "mgda", "grad_accumulation_steps": 2},
        {"balancer": "inverse_metric", "param_groups": {"*_head": {"lr": 0.05}}},
        pytest.param(
            {"balancer": {"type": "torchjd.aggregation.UPGrad"}},
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torchjd") is None
                or importlib.util.find_spec("quadprog") is None,
                reason="needs mtlgraph[torchjd]",
            ),
        ),
        {
            "balancer": {"name": "mgda", "gradients": "representation"},
            "grad_accumulation_steps": 2,
        },
        {"balancer": {"name": "nash_mtl", "gradients": "representation"}},
    ],
    ids=[
        "uncertainty",
        "dwa",
        "pcgrad",
        "gradnorm",
        "mgda+accumulation",
        "inverse_metric+groups",
        "torchjd-upgrad",
        "mgda-representation+accumulation",
        "nash_mtl-representation",
    ],
)
def test_resume_is_exact_with_balancers_and_controls(tmp_path: Path, extra: dict) -> None:
    """Learned weights, loss histories, generator states and accumulation survive a resume."""
    cfg = {**CONFIG, "batch_scheduler": "mixed", "checkpoint_every": 4, **extra}
    model, loaders = _setup()
    reference = Trainer(run_dir=str(tmp_path / "ref"), **cfg)
    reference.fit(model, loaders)
    expected = _params(model)
    model, loaders = _setup(at=2 * 22 + 1)  # stop in the second epoch (10 steps an epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **cfg).fit(model, loaders)
    assert load_checkpoint(tmp_path / "run")["run"]["progress"]["global_step"] > 0
    model, loaders = _setup()
    resumed = Trainer(run_dir=str(tmp_path / "run"), **cfg)
    resumed.fit(model, loaders, resume_from=tmp_path / "run")
    assert all(torch.equal(expected[k], v) for k, v in _params(model).items())
    assert resumed.history == reference.history


def test_checkpoint_contents(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(run_dir=str(tmp_path), **{**CONFIG, "n_epochs": 1})
    trainer.fit(model, loaders)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["format"] == FORMAT and state["version"] == 3
    assert set(state) == {
        "format",
        "version",
        "model",
        "task_names",
        "optimizer",
        "lr_scheduler",
        "balancer",
        "run",
        "rng",
        "hooks",
        "config",
    }
    run = state["run"]
    assert set(run) == {
        "progress",
        "scheduler",
        "history",
        "window",
        "epoch_losses",
        "rank_records",
    }
    assert run["progress"]["global_step"] == 17 and run["progress"]["epoch"] == 1
    assert set(state["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert run["scheduler"]["rng"]["bit_generator"] == "PCG64"
    # every hook's state under its name, in firing order
    assert list(state["hooks"]) == ["nonfinite", "evaluation", "writers", "checkpoint"]
    best = state["hooks"]["checkpoint"]
    assert best["metric"] == "a/da/valid/accuracy" and best["mode"] == "max"
    assert isinstance(best["value"], float)
    assert state["config"]["trainer"]["lr"] == 0.02
    assert run["history"] == trainer.history


def test_best_mode_comes_from_the_metric(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(
        run_dir=str(tmp_path),
        n_epochs=3,
        progress_bar=False,
        checkpoint_metric="model/all/train/loss",
    )
    trainer.fit(model, loaders)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["hooks"]["checkpoint"]
    losses = [r["model/all/train/loss"] for r in trainer.history]
    assert best["mode"] == "min" and best["value"] == min(losses)
    assert best["step"] == trainer.history[losses.index(min(losses))]["step"]


def test_unknown_checkpoint_metric_is_rejected_before_training(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(
        run_dir=str(tmp_path), progress_bar=False, checkpoint_metric="a/da/vaild/accuracy"
    )
    with pytest.raises(
        Exception,
        match=r"'a/da/vaild/accuracy' is not a key this training logs "
        r"\(did you mean 'a/da/valid/accuracy'\?\)",
    ):
        trainer.fit(model, loaders)
    assert trainer.global_step == 0


def test_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": Path("not a tensor")}, path)
    with pytest.raises(
        CheckpointError,
        match=r"refusing to load checkpoint .*evil.pt': it holds a "
        r"pickled Python object.*weights_only=True",
    ):
        load_checkpoint(path)
    model, _ = _setup()
    with pytest.raises(CheckpointError, match="pickled Python object"):
        model.load(path)
    with pytest.raises(CheckpointError, match="pickled Python object"):
        Trainer(progress_bar=False).fit(model, _setup()[1], resume_from=path)


def test_saving_refuses_values_weights_only_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint.history\[0\].acc is a numpy.float64"):
        save_checkpoint({"history": [{"acc": np.float64(0.5)}]}, tmp_path / "x.pt")
    check_plain({"a": [1, 2.0, "s", None, True, (torch.zeros(2),)], "b": torch.Size([2])})
    assert not (tmp_path / "x.pt").exists()


def test_foreign_missing_and_newer_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not an mtlgraph training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint({"format": FORMAT, "version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="has format version 99"):
        load_checkpoint(tmp_path / "new.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")
    (tmp_path / "text.pt").write_text("garbage")  # not a pickled object: not "refused"
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*not a file torch.save"):
        load_checkpoint(tmp_path / "text.pt")


def test_resume_with_other_data_is_refused(tmp_path: Path) -> None:
    model, loaders = _setup()
    Trainer(run_dir=str(tmp_path), **{**CONFIG, "n_epochs": 1}).fit(model, loaders)
    model, loaders = _setup()
    loaders[0] = make_loader(
        "da", "train", {"x": torch.zeros(32, 2)}, {"a": torch.zeros(32).long()}, 16
    )
    with pytest.raises(
        CheckpointError, match=r"training loaders had \[10, 7\] batches, these have \[2, 7\]"
    ):
        Trainer(**CONFIG).fit(model, loaders, resume_from=tmp_path)


def test_rng_state_round_trip() -> None:
    import random

    state = get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


_WRITER = """
import sys, torch
from mtlgraph.graph.model_file import FORMAT
from mtlgraph.training.checkpoint import save_checkpoint
path = sys.argv[1]
big = torch.arange(4_000_000, dtype=torch.float32)
i = 0
while True:
    i += 1
    save_checkpoint({"format": FORMAT, "version": 1, "i": i, "big": big + i}, path)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_checkpoint_killed_mid_write_never_leaves_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    for delay in (0.0, 0.013, 0.031, 0.057):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)],
            env=cli_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one complete checkpoint exists
        assert first.strip().isdigit()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)  # never torn: the old file or the whole new one
        assert torch.equal(state["big"], torch.arange(4_000_000, dtype=torch.float32) + state["i"])
    (path.parent / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    Checkpointer(path.parent)  # a new run clears the temporaries a killed writer left
    assert not list(path.parent.glob(".last.pt.*.tmp"))
    assert load_checkpoint(path)["format"] == FORMAT
