"""Log writers: metrics.jsonl, TensorBoard events (read back with tensorboard itself), hooks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import make_loader, make_task
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from mtlgraph import ConfigError, Hook, MtlGraphError, MultitaskClassifier, Trainer
from mtlgraph._io import write_json
from mtlgraph.training.distributed import DistEnv
from mtlgraph.training.hooks import Run
from mtlgraph.training.trainer import FitLoop
from mtlgraph.training.writers import (
    WRITERS,
    JsonlWriter,
    TensorBoardWriter,
    Writer,
    WriterContext,
    flatten,
    hparam_values,
    open_writers,
    safe_filename,
)


def _setup() -> tuple[MultitaskClassifier, list]:
    import torch

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    model = MultitaskClassifier([make_task("a", trunk, width=8), make_task("b", trunk, width=8)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    loaders = [
        make_loader("da", split, {"x": x}, {"a": (x[:, 0] > 0).long()}, batch_size=16)
        for split in ("train", "valid")
    ] + [make_loader("db", "train", {"x": x}, {"b": (x[:, 1] > 0).long()}, batch_size=16)]
    return model, loaders


class Collect(Writer):
    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.final: Mapping[str, float] | None = None
        self.closed = 0

    def write(self, record: Mapping[str, float]) -> None:
        self.records.append(dict(record))

    def close(self, final: Mapping[str, float] | None = None) -> None:
        self.final, self.closed = final, self.closed + 1


def test_custom_writer_receives_every_history_record() -> None:
    model, loaders = _setup()
    w = Collect()
    trainer = Trainer(n_epochs=3, progress_bar=False, writers=[w])
    trainer.fit(model, loaders)
    assert w.records == trainer.history and len(w.records) == 3
    assert w.final == trainer.history[-1] and w.closed == 1


def test_writers_are_closed_without_final_when_training_fails() -> None:
    model, loaders = _setup()
    w = Collect()

    def boom(out, target):  # type: ignore[no-untyped-def]
        raise RuntimeError("loss failed")

    model.tasks["a"].loss_func = boom
    with pytest.raises(RuntimeError, match="loss failed"):
        Trainer(n_epochs=1, progress_bar=False, writers=[w]).fit(model, loaders)
    assert w.closed == 1 and w.final is None


def test_run_dir_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(
        n_epochs=2,
        progress_bar=False,
        run_dir=str(tmp_path),
        evaluation_unit="steps",
        evaluation_freq=4,
    )
    trainer.fit(model, loaders)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == trainer.history
    assert len(lines) == 4  # 16 steps, every 4

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    keys = {k for k in trainer.history[0] if "/" in k}
    assert keys <= tags
    assert {"a/da/valid/accuracy", "model/all/train/loss", "a/da/train/loss"} <= tags
    loss = acc.Scalars("model/all/train/loss")
    assert [e.step for e in loss] == [4, 8, 12, 16]
    assert [e.value for e in loss] == pytest.approx(
        [r["model/all/train/loss"] for r in trainer.history]
    )
    # hparams: the flattened config, in the same run, with the final scores
    assert "_hparams_/session_start_info" in acc.summary_metadata
    content = acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"lr" in content and b"n_epochs" in content
    assert "hparams/a/da/valid/accuracy" in tags


def test_writer_names_need_a_run_dir_and_are_validated(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(
        ConfigError,
        match=r"writers\[0\]: unknown writer 'tensorbord' \(did you mean "
        r"'tensorboard'\?\)",
    ):
        Trainer(writers=["tensorbord"])
    model, loaders = _setup()
    with caplog.at_level("WARNING", logger="mtlgraph"):
        Trainer(n_epochs=1, progress_bar=False, writers=["jsonl"]).fit(model, loaders)
    assert "run_dir is not set: no checkpoints or jsonl are written" in caplog.text


def test_jsonl_writer_nan_and_resume_truncation(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    w = JsonlWriter(path)
    for step in (1, 2, 3):
        w.write({"step": float(step), "t/d/valid/r2": math.nan if step == 2 else 0.5})
    w.close()
    assert json.loads(path.read_text().splitlines()[1])["t/d/valid/r2"] is None
    w = JsonlWriter(path, resume_step=2)  # lines after the checkpoint's step are dropped
    w.write({"step": 3.0, "t/d/valid/r2": 0.75})
    w.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1.0, 2.0, 3.0]
    assert json.loads(path.read_text().splitlines()[-1])["t/d/valid/r2"] == 0.75


def test_tensorboard_resume_purges_later_events(tmp_path: Path) -> None:
    w = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3):
        w.write({"step": float(step), "m/all/train/loss": float(step)})
    w.close()
    w = TensorBoardWriter(tmp_path, resume_step=2)
    w.write({"step": 3.0, "m/all/train/loss": 30.0})
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("m/all/train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]


def test_helpers() -> None:
    assert safe_filename("a/b/valid/accuracy") == "a_b_valid_accuracy"
    assert safe_filename("../x") == "_x"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": [1, 2]}
    assert hparam_values({"a": [1, 2], "b": None, "c": 0.5}) == {
        "a": "[1, 2]",
        "b": "null",
        "c": 0.5,
    }


def test_a_new_run_in_a_used_directory_replaces_its_logs(tmp_path: Path) -> None:
    for value in (1.0, 2.0):
        w = JsonlWriter(tmp_path / "metrics.jsonl")
        t = TensorBoardWriter(tmp_path)
        for step in (1, 2):
            record = {"step": float(step), "m/all/train/loss": value * step}
            w.write(record)
            t.write(record)
        w.close()
        t.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["m/all/train/loss"] for r in lines] == [2.0, 4.0]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("m/all/train/loss")] == [(1, 2.0), (2, 4.0)]


def test_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1.0}\n{"step": 2.0}\n{"step": 3')  # killed mid-write
    JsonlWriter(path, resume_step=5).close()
    assert path.read_text() == '{"step": 1.0}\n{"step": 2.0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left


def test_write_json_is_atomic_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "scores.json"
    write_json(target, {"a": math.nan, "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": None, "b": [1, 2]}

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json(target, {"a": Boom()})  # fails while writing: the old file stays whole
    assert json.loads(target.read_text()) == {"a": None, "b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["scores.json"]


def test_named_writers_are_a_registry_and_errors_are_mtlgraph_errors(tmp_path: Path) -> None:
    records: list[Mapping[str, float]] = []

    class Collect(Writer):
        def write(self, record: Mapping[str, float]) -> None:
            records.append(record)

    def collect(ctx: WriterContext) -> Writer:
        return Collect()

    WRITERS.register("collect_for_test_writers", collect)
    try:
        (w,) = open_writers(["collect_for_test_writers"], WriterContext(tmp_path))
        w.write({"step": 1.0})
        assert records == [{"step": 1.0}]
    finally:
        WRITERS.unregister("collect_for_test_writers")
    with pytest.raises(ConfigError, match="writer 'jsonl' needs a run directory") as info:
        open_writers(["jsonl"], None)
    assert isinstance(info.value, MtlGraphError)
    with pytest.raises(ConfigError, match=r"unknown writer 'jsnl' \(did you mean 'jsonl'\?\)"):
        open_writers(["jsnl"], WriterContext(tmp_path))


class LogsEveryThirdStep(Hook):
    def on_step_end(self, run: Run) -> None:
        if run.global_step % 3 == 0:
            run.log({"custom/step": run.global_step})


class WhenWritten(Collect):
    """Notes the trainer's step at each write."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Trainer | None = None
        self.at: list[int] = []

    def write(self, record: Mapping[str, float]) -> None:
        super().write(record)
        assert self.trainer is not None
        self.at.append(self.trainer.global_step)


def test_the_writers_hook_writes_step_records_at_their_step_in_history_order() -> None:
    model, loaders = _setup()
    w = WhenWritten()
    trainer = Trainer(n_epochs=2, writers=[w], hooks=[LogsEveryThirdStep()], progress_bar=False)
    w.trainer = trainer
    trainer.fit(model, loaders)
    assert w.records == trainer.history and w.closed == 1
    steps = [r["step"] for r in w.records if "custom/step" in r]
    assert steps == [3.0, 6.0, 9.0, 12.0, 15.0] and len(w.records) == 7  # and 2 evaluations
    assert w.at == [int(r["step"]) for r in w.records]  # written at the step that logged it


def test_writers_cost_a_step_nothing_without_hooks_that_act_at_steps() -> None:
    model, loaders = _setup()
    w = Collect()
    trainer = Trainer(n_epochs=1, writers=[w], progress_bar=False)
    loop = FitLoop(trainer, model, [loaders[0], loaders[2]], [loaders[1]], DistEnv(), None)
    assert [type(h).__name__ for h in loop.run_view.hooks] == [
        "NonfiniteGuard",
        "EvaluationHook",
        "LogWriters",
    ]
    assert not loop.run_view.has_step_hooks  # the loop skips step_end
    assert loop.writers is not None and loop.writers.writers == [w]
