"""The compat Trainer: an interrupted run resumes to the same result (``fit(...,
resume_from=...)`` and ``Trainer.save``/``load``), logs and checkpoints each go where Snorkel
put them, and Snorkel's LR schedules step per batch, clamped at ``min_lr``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mtlgraph
from mtlgraph import CheckpointError, ConfigError, DataError
from mtlgraph.compat.snorkel import (
    MultitaskClassifier,
    SnorkelCompatNote,
    Trainer,
    snorkel_to_mtlgraph,
)

from .conftest import loaders, snorkel_model

STEPS = 4  # batches of the training loader per epoch


def config(ckpt: Path, **more: Any) -> dict[str, Any]:
    """Three epochs, Snorkel's per-batch exponential decay, a checkpoint every epoch."""
    return {
        "n_epochs": 3,
        "lr": 0.05,
        "progress_bar": False,
        "lr_scheduler": "exponential",
        "lr_scheduler_config": {"exponential_config": {"gamma": 0.8}},
        "checkpointing": True,
        "checkpointer_config": {"checkpoint_dir": str(ckpt)},
        **more,
    }


def interrupt_at(model: MultitaskClassifier, call: int) -> None:
    """Make the model's ``call``-th loss computation fail, as a killed process would stop."""
    real, calls = model.calculate_loss, [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt("power cut")
        return real(*args, **kwargs)

    model.calculate_loss = failing  # type: ignore[method-assign]


def same_weights(a: MultitaskClassifier, b: MultitaskClassifier) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultitaskClassifier, Trainer]:
    """The uninterrupted run."""
    model, trainer = snorkel_model(), Trainer(**config(tmp_path_factory.mktemp("a")))
    trainer.fit(model, loaders())
    return model, trainer


def test_an_interrupted_run_resumes_to_the_same_result(
    tmp_path: Path, straight: tuple[MultitaskClassifier, Trainer]
) -> None:
    model = snorkel_model()
    interrupt_at(model, 2 * STEPS + 2)  # in the third epoch, after the second checkpoint
    with pytest.raises(KeyboardInterrupt):
        Trainer(**config(tmp_path)).fit(model, loaders())
    again, trainer = snorkel_model(seed=5), Trainer(**config(tmp_path))
    trainer.fit(again, loaders(), resume_from=tmp_path)
    assert same_weights(again, straight[0])
    assert trainer.history == straight[1].history  # losses, scores and LR of every epoch


def test_trainer_save_and_load_continue_the_run(
    tmp_path: Path, straight: tuple[MultitaskClassifier, Trainer]
) -> None:
    model, first = snorkel_model(), Trainer(**config(tmp_path / "ck"))
    interrupt_at(model, STEPS + 1)
    with pytest.raises(KeyboardInterrupt):
        first.fit(model, loaders())
    first.save(tmp_path / "trainer.pt")
    fresh = Trainer(n_epochs=1)
    fresh.load(tmp_path / "trainer.pt", model=None)  # Snorkel: the saved config comes back
    assert fresh.config == first.config and fresh.snorkel_config == first.snorkel_config
    again = snorkel_model(seed=5)
    fresh.load(tmp_path / "trainer.pt", model=again)
    (tmp_path / "trainer.pt").unlink()  # load read it, as Snorkel's did
    fresh.fit(again, loaders())
    assert same_weights(again, straight[0])
    first.save(tmp_path / "trainer.pt")
    with pytest.raises(CheckpointError, match="is from another model"):
        fresh.load(tmp_path / "trainer.pt", model=snorkel_model(name="u", head="u_head"))


def test_save_without_checkpointing_and_before_fit(tmp_path: Path) -> None:
    trainer = Trainer(n_epochs=1, progress_bar=False)
    with pytest.raises(ConfigError, match="Trainer.save: no run to save yet; call fit first"):
        trainer.save(tmp_path / "t.pt")
    model = snorkel_model()
    trainer.fit(model, loaders())
    trainer.save(tmp_path / "t.pt")
    assert trainer.config.run_dir is None  # the run's state went to a directory of its own
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    assert saved["snorkel"]["config"] == {"n_epochs": 1, "progress_bar": False}
    assert saved["run"]["progress"]["batch_counts"] == [STEPS]


def test_logs_and_checkpoints_go_to_their_own_directories(tmp_path: Path) -> None:
    logs, ckpt = tmp_path / "logs", tmp_path / "ck"
    trainer = Trainer(
        **config(ckpt, n_epochs=2),
        logging=True,
        log_writer="json",
        log_writer_config={"log_dir": str(logs), "run_name": "r1"},
    )
    model = snorkel_model()
    interrupt_at(model, STEPS + 1)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(model, loaders())
    again = Trainer(**trainer.snorkel_config)
    again.fit(snorkel_model(), loaders(), resume_from=ckpt)
    lines = (logs / "r1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [STEPS, 2 * STEPS]  # none twice
    assert "model/all/train/loss" in json.loads(lines[0])
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (ckpt / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_checkpoint_dir_none_and_min_lr_above_lr_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Trainer(
            lr=0.01,
            lr_scheduler="linear",
            lr_scheduler_config={"min_lr": 0.1},
            checkpointing=True,
            checkpointer_config={"checkpoint_dir": None, "checkpoint_clear": False},
        )
    text = str(info.value)
    assert "checkpointer_config.checkpoint_dir: None; Snorkel failed on it too" in text
    assert "min_lr: 0.1 is above lr=0.01; Snorkel raised the learning rate to min_lr" in text
    assert "checkpoint_clear: False (keep every checkpoint) is not supported" in text


@pytest.mark.parametrize(
    ("name", "params", "factor"),
    [
        ("exponential", {"exponential_config": {"gamma": 0.5}}, lambda s: 0.5**s),
        ("step", {"step_config": {"gamma": 0.5, "step_size": 3}}, lambda s: 0.5 ** (s // 3)),
        ("linear", {}, lambda s: 1 - s / (2 * STEPS)),
    ],
)
def test_snorkel_schedules_step_per_batch_and_clamp_at_min_lr(
    name: str, params: dict[str, Any], factor: Any
) -> None:
    lrs: list[float] = []
    model = snorkel_model()
    real = model.calculate_loss

    def record(*args: Any, **kwargs: Any) -> Any:
        lrs.append(trainer.optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]
        return real(*args, **kwargs)

    model.calculate_loss = record  # type: ignore[method-assign]
    settings = {"lr_scheduler": name, "lr_scheduler_config": {**params, "min_lr": 0.004}}
    trainer = Trainer(n_epochs=2, lr=0.04, progress_bar=False, **settings)
    trainer.fit(model, loaders())
    expected = [max(0.04 * factor(s), 0.004) for s in range(2 * STEPS)]
    assert lrs == pytest.approx(expected)


def test_warmup_translation() -> None:
    assert snorkel_to_mtlgraph({"lr_scheduler_config": {"warmup_steps": 3}})["warmup_steps"] == 3
    cfg = snorkel_to_mtlgraph(
        {"lr_scheduler_config": {"warmup_steps": 2, "warmup_percentage": 0.5}}
    )
    assert "warmup_fraction" not in cfg  # Snorkel ignored the percentage then


def test_fit_ignores_labels_naming_no_task_with_one_note() -> None:
    model = snorkel_model()
    with pytest.warns(SnorkelCompatNote, match="labels 'spare' name no task") as notes:
        trainer = Trainer(n_epochs=1, progress_bar=False)
        trainer.fit(model, loaders(labels=("t", "spare")))
    assert len([n for n in notes if issubclass(n.category, SnorkelCompatNote)]) == 1
    assert "t/d/valid/accuracy" in trainer.history[-1]
    with pytest.raises(DataError, match="spare"):  # mtlgraph's Trainer stays strict
        mtlgraph.Trainer(progress_bar=False).fit(model, loaders(labels=("t", "spare")))
