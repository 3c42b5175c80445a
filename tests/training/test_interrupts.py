"""Trainer.fit under SIGINT/SIGTERM (Python API), honest resume of changed settings, and a
checkpoint that cannot be written."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import CheckpointError, ConfigError, Hook, MultitaskClassifier, Trainer
from mtlgraph.exceptions import TrainingInterrupted
from mtlgraph.signals import StopSignals
from mtlgraph.training import checkpoint as ckpt
from mtlgraph.training.config import RESUME_APPLIED, RESUME_REFUSED, TrainerConfig

BASE: dict[str, Any] = {"n_epochs": 2, "lr": 0.05, "progress_bar": False}


def _setup() -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.2))
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, generator=g)
    y = {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}
    loaders = [
        make_loader("d", "train", {"x": x}, y, 8, shuffle=True, seed=2),
        make_loader("d", "valid", {"x": x[:16]}, {k: v[:16] for k, v in y.items()}, 8),
    ]
    return model, loaders


class SignalAt(Hook):
    """Sends ``signals`` to this process after optimizer step ``step``."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals = step, signals

    def on_step_end(self, run: Any) -> None:
        if run.global_step == self.step:
            for s in self.signals:
                os.kill(os.getpid(), s)


def _mine(signum: int, frame: object) -> None:  # a handler installed by the "application"
    raise AssertionError("the application's handler must not run during fit")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_fit_stops_after_the_step_writes_last_pt_and_resumes_exactly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    model, loaders = _setup()
    Trainer(**BASE, run_dir=str(tmp_path / "ref")).fit(model, loaders)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    previous = signal.signal(sig, _mine)
    try:
        model, loaders = _setup()
        trainer = Trainer(**BASE, run_dir=str(tmp_path / "run"), hooks=[SignalAt(5, sig)])
        with pytest.raises(TrainingInterrupted) as caught:
            trainer.fit(model, loaders)
        assert signal.getsignal(sig) is _mine  # the application's handler is back
    finally:
        signal.signal(sig, previous)
    e = caught.value
    assert (e.signum, e.step, e.exit_status) == (sig, 5, 128 + sig)
    assert e.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    saved = ckpt.load_checkpoint(e.checkpoint)
    assert saved["run"]["progress"]["global_step"] == 5 and saved["run"]["progress"]["epoch"] == 0

    model, loaders = _setup()
    Trainer(**BASE, run_dir=str(tmp_path / "run")).fit(model, loaders, resume_from=e.checkpoint)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    a = ckpt.load_checkpoint(tmp_path / "ref")["run"]["history"]
    assert a == ckpt.load_checkpoint(tmp_path / "run")["run"]["history"]


def test_without_a_run_dir_the_interrupt_names_no_checkpoint() -> None:
    model, loaders = _setup()
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 2") as caught:
        Trainer(**BASE, hooks=[SignalAt(2, signal.SIGTERM)]).fit(model, loaders)
    assert caught.value.checkpoint is None


def test_a_second_signal_stops_at_once_and_the_handlers_are_restored(tmp_path: Path) -> None:
    model, loaders = _setup()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    hook = SignalAt(3, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="by SIGINT inside a step") as caught:
        Trainer(**BASE, run_dir=str(tmp_path), hooks=[hook]).fit(model, loaders)
    assert caught.value.checkpoint is None and caught.value.step is None
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_interrupted_fit_closes_its_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtlgraph.training import hooks

    bars: list[Any] = []

    class Bar:  # records what the run does with its tqdm bar
        def __init__(self, **kwargs: Any) -> None:
            self.n, self.closed = 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(hooks, "tqdm", Bar)
    model, loaders = _setup()
    trainer = Trainer(**{**BASE, "progress_bar": True}, hooks=[SignalAt(3, signal.SIGTERM)])
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 3"):
        trainer.fit(model, loaders)
    assert [(bar.n, bar.closed) for bar in bars] == [(3, True)]


def test_a_finished_fit_leaves_the_handlers_as_they_were() -> None:
    model, loaders = _setup()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    Trainer(**BASE).fit(model, loaders)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize(
    ("mine", "others", "agreed"), [(0, [0], 0), (0, [15], 15), (2, [0], 2), (2, [15], 15)]
)
def test_ranks_agree_on_the_largest_signal(mine: int, others: list[int], agreed: int) -> None:
    def reduce_max(flag: torch.Tensor) -> None:  # what all_reduce(MAX) computes over ranks
        flag.copy_(torch.tensor([max([int(flag.item()), *others])]))

    stop = StopSignals(reduce_max)
    stop.signum = mine
    assert stop.agreed() == agreed


# ---------------------------------------------------------------- honest resume


def test_every_trainer_setting_is_applied_or_refused_on_resume() -> None:
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert RESUME_APPLIED | set(RESUME_REFUSED) == fields
    # only the optimizer's and param_groups' values are applied while their kind is refused
    assert RESUME_APPLIED & set(RESUME_REFUSED) == {"optimizer", "param_groups"}


def _cut(tmp_path: Path, **cfg: Any) -> Path:
    """A run of ``cfg`` stopped by SIGTERM after step 3 (its last.pt)."""
    model, loaders = _setup()
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        trainer = Trainer(**{**BASE, **cfg}, run_dir=str(run), hooks=[SignalAt(3, signal.SIGTERM)])
        trainer.fit(model, loaders)
    return run


@pytest.mark.parametrize(
    ("key", "old", "new", "group_key"),
    [
        ("lr", 0.05, 0.2, "lr"),
        ("weight_decay", 0.0, 0.01, "weight_decay"),
        (
            "optimizer",
            {"name": "adam", "betas": [0.9, 0.999]},
            {"name": "adam", "betas": [0.8, 0.9]},
            "betas",
        ),
    ],
)
def test_a_changed_optimizer_setting_is_applied(
    tmp_path: Path, key: str, old: Any, new: Any, group_key: str
) -> None:
    run = _cut(tmp_path, **{key: old})
    model, loaders = _setup()
    trainer = Trainer(**{**BASE, key: new}, run_dir=str(run))
    trainer.fit(model, loaders, resume_from=run)
    assert trainer.optimizer is not None
    want = new["betas"] if key == "optimizer" else new
    saved = ckpt.load_checkpoint(run)["optimizer"]["param_groups"][0][group_key]
    for value in (trainer.optimizer.param_groups[0][group_key], saved):
        assert (list(value) if isinstance(value, tuple | list) else value) == want


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [
        ("optimizer", "adam", "sgd"),
        ("balancer", "sum", "uncertainty"),
        ("batch_scheduler", "shuffled", "sequential"),
        ("seed", 0, 1),
        ("grad_accumulation_steps", 1, 2),
        ("freeze", [], ["a_head"]),
    ],
)
def test_a_changed_refused_setting_names_the_key(
    tmp_path: Path, key: str, old: Any, new: Any
) -> None:
    run = _cut(tmp_path, **{key: old})
    model, loaders = _setup()
    with pytest.raises(ConfigError, match=rf"{key}: the run has .*, this config "):
        Trainer(**{**BASE, key: new}, run_dir=str(run)).fit(model, loaders, resume_from=run)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_a_checkpoint_error_and_the_previous_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"format": "x", "step": 1}, path)
    before = path.read_bytes()

    def full(obj: object, fh: Any) -> None:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint '{path}': No space left"):
        ckpt.save_checkpoint({"format": "x", "step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_best_tracking_restarts_when_the_mode_changes() -> None:
    checkpointer = ckpt.Checkpointer(Path("."), "t/d/valid/acc", "min", write=False)
    checkpointer.load_best_state({"metric": "t/d/valid/acc", "mode": "max", "value": 0.9})
    assert checkpointer.best_value is None
    checkpointer.load_best_state({"metric": "t/d/valid/acc", "mode": "min", "value": 0.9})
    assert checkpointer.best_value == 0.9
