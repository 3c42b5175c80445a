"""The run state: one object per fit, global random states left alone, the LR horizon asked of
the scheduler, registries of optimizers and LR schedules."""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Interrupt, make_loader, make_task
from torch import nn

from mtlgraph import BatchScheduler, CheckpointError, ConfigError, MultitaskClassifier, Trainer
from mtlgraph.registry import Registry
from mtlgraph.training.checkpoint import VERSION, load_checkpoint, save_checkpoint
from mtlgraph.training.lr import LR_SCHEDULES
from mtlgraph.training.optim import OPTIMIZERS
from mtlgraph.training.state import LossRecord, RunState, loss_sums, train_losses
from mtlgraph.training.trainer import FitLoop


def _setup(at: int = 0) -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.2), Interrupt(at))
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g)
    loaders = [
        make_loader("A", "train", {"x": x}, {"a": (x[:, 0] > 0).long()}, 16, shuffle=True),
        make_loader("B", "train", {"x": x}, {"b": (x[:, 1] > 0).long()}, 16, shuffle=True),
        make_loader("A", "valid", {"x": x[:32]}, {"a": (x[:32, 0] > 0).long()}, 16),
    ]
    return model, loaders


def _global_states() -> tuple[torch.Tensor, object, object]:
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state(legacy=False)


def _same(a: tuple, b: tuple) -> bool:
    np_a, np_b = a[2], b[2]
    return (
        torch.equal(a[0], b[0])
        and a[1] == b[1]
        and np.array_equal(np_a["state"]["key"], np_b["state"]["key"])  # type: ignore[index]
        and np_a["state"]["pos"] == np_b["state"]["pos"]  # type: ignore[index]
        and np_a["has_gauss"] == np_b["has_gauss"]  # type: ignore[index]
    )


def test_fit_leaves_every_global_random_state_as_it_found_it(tmp_path: Path) -> None:
    config = {"n_epochs": 2, "progress_bar": False, "checkpoint_every": 3}
    config |= {"checkpoint_unit": "steps", "run_dir": str(tmp_path)}
    runs = [(_setup(at=7), None), (_setup(), None), (_setup(), tmp_path)]
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    random.random(), np.random.rand()  # states other than a fresh seed's
    before = _global_states()
    for (model, loaders), resume_from in runs:  # interrupted, plain, resumed
        try:
            Trainer(**config).fit(model, loaders, resume_from=resume_from)
        except KeyboardInterrupt:
            assert resume_from is None
        assert _same(before, _global_states())


def test_a_second_fit_starts_a_fresh_run() -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=2, progress_bar=False, diagnostics={"every": 2, "batch_size": 8})
    trainer.fit(model, loaders)
    first = [r["step"] for r in trainer.history if "model/all/train/loss" in r]
    assert first == [8.0, 16.0] and trainer.diagnostics is not None
    trainer.fit(model, loaders)
    assert [r["step"] for r in trainer.history if "model/all/train/loss" in r] == first
    assert trainer.global_step == 16
    model, loaders = _setup(at=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(model, loaders)
    assert trainer.diagnostics is None  # not the previous fit's report
    assert [r["step"] for r in trainer.history] == [2.0]  # this fit's probe only
    assert trainer.global_step == 2


class Growing(BatchScheduler):
    """Epoch k (0-based) takes the first 2 * (k + 1) batches of loader 0."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.calls = 0

    def schedule(self, batch_counts: Sequence[int]) -> list[int]:
        self.calls += 1
        return [0] * min(batch_counts[0], 2 * self.calls)


def test_the_lr_horizon_follows_epochs_of_different_lengths() -> None:
    scheduler = Growing()
    assert scheduler.epoch_lengths([8], 3) == [2, 4, 6] and scheduler.calls == 0
    model, loaders = _setup()
    trainer = Trainer(
        n_epochs=2, lr=0.1, lr_scheduler="linear", batch_scheduler=Growing(), progress_bar=False
    )
    trainer.fit(model, loaders[:1])
    assert trainer.global_step == 6  # 2 + 4 steps
    # the last step (global step 5 of 6) ran at factor 1 - 5/6: the schedule spans both epochs
    assert trainer.history[-1]["model/all/train/lr"] == pytest.approx(0.1 / 6)


def test_loss_records_are_named_and_averaged_by_count() -> None:
    records = [
        LossRecord("a", "A", torch.tensor(1.0), 2),
        LossRecord("a", "A", torch.tensor(4.0), 1),
        LossRecord("b", "B", torch.tensor(3.0), 1),
    ]
    assert records[0].task == "a" and records[0].count == 2
    losses = train_losses(loss_sums(records))
    assert losses == {"a/A/train/loss": 2.0, "b/B/train/loss": 3.0, "model/all/train/loss": 2.25}


def test_run_state_round_trip_keeps_this_ranks_records() -> None:
    state = RunState(epoch=1, step_in_epoch=2, global_step=7, batch_counts=[3, 2], world_size=2)
    state.plan = [(0,), (1,), (0,)]
    mine = [LossRecord("a", "A", torch.tensor(0.5), 4)]
    other = [LossRecord("b", "B", torch.tensor(0.25), 3)]
    saved = state.state_dict(rank_records=[(mine, []), (other, mine)])
    assert saved["progress"]["loader_positions"] == [1, 1]
    restored = RunState()
    restored.load_state_dict(saved, rank=1)
    assert (restored.epoch, restored.step_in_epoch, restored.global_step) == (1, 2, 7)
    assert restored.window == [LossRecord("b", "B", torch.tensor(0.25), 3)]
    assert restored.epoch_losses[0].count == 4


def test_an_older_checkpoint_version_is_refused_at_resume(tmp_path: Path) -> None:
    config = {"n_epochs": 1, "progress_bar": False, "run_dir": str(tmp_path / "run")}
    model, loaders = _setup()
    Trainer(**config).fit(model, loaders)
    state = load_checkpoint(tmp_path / "run")
    assert VERSION == 3 and state["version"] == 3
    save_checkpoint({**state, "version": 2}, tmp_path / "v2.pt")
    assert load_checkpoint(tmp_path / "v2.pt")["model"].keys() == state["model"].keys()  # readable
    model, loaders = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="format version 2, written by an older mtlgraph"):
        Trainer(**config).fit(model, loaders, resume_from=tmp_path / "v2.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_optimizers_and_lr_schedules_are_registries_with_checked_kwargs() -> None:
    assert isinstance(OPTIMIZERS, Registry) and isinstance(LR_SCHEDULES, Registry)

    def halves(progress: float, epoch: int, every: int = 1) -> float:
        return 0.5 ** (epoch // every)

    OPTIMIZERS.register("rmsprop_test", torch.optim.RMSprop)
    LR_SCHEDULES.register("halves_test", halves)
    try:
        LR_SCHEDULES.register("halves_test", halves)  # the same object again: a no-op
        with pytest.raises(ConfigError, match="already registered"):
            LR_SCHEDULES.register("halves_test", lambda p, e: 1.0)
        with pytest.raises(ConfigError) as info:
            Trainer(
                optimizer={"name": "rmsprop_test", "alpah": 0.9},
                lr_scheduler={"name": "halves_test", "evry": 2},
            )
        text = str(info.value)
        assert "optimizer.alpah: optimizer 'rmsprop_test' takes no argument 'alpah' (did" in text
        assert "lr_scheduler.evry: LR schedule 'halves_test' takes no argument 'evry' (did" in text
        model, loaders = _setup()
        trainer = Trainer(
            n_epochs=2,
            lr=0.1,
            optimizer={"name": "rmsprop_test", "alpha": 0.9},
            lr_scheduler="halves_test",
            progress_bar=False,
        )
        trainer.fit(model, loaders)
        assert isinstance(trainer.optimizer, torch.optim.RMSprop)
        assert [r["model/all/train/lr"] for r in trainer.history] == [0.1, 0.05]
    finally:
        OPTIMIZERS.unregister("rmsprop_test")
        LR_SCHEDULES.unregister("halves_test")


def test_the_core_loop_fits_on_one_screen() -> None:
    assert len(inspect.getsource(FitLoop.run).splitlines()) <= 60
    assert "FitLoop.run" in (Trainer.fit.__doc__ or "")
