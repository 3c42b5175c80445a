"""Hooks: the public Hook and Run, the built-in hooks in their fixed order, EarlyStopping, hook
specs in Python and YAML, hook state across resume."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Interrupt, make_loader, make_task
from experiment_helpers import tiny_config, write_config
from torch import nn

from mtlgraph import ConfigError, EarlyStopping, Hook, MultitaskClassifier, Trainer
from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config
from mtlgraph.training import hooks as hooks_module
from mtlgraph.training.checkpoint import load_checkpoint
from mtlgraph.training.hooks import Every, Run


class Gated(Hook):
    """Counts its step and epoch events, with a trigger."""

    def __init__(self, every: Every) -> None:
        self.every = every
        self.steps: list[int] = []
        self.epochs: list[int] = []

    def on_step_end(self, run: Run) -> None:
        self.steps.append(run.global_step)

    def on_epoch_end(self, run: Run) -> None:
        self.epochs.append(run.epoch)


def test_every_gates_its_own_event_only() -> None:
    hooks = [Gated(Every(3, "step")), Gated(Every(2, "epoch")), Gated(Every(0, "step"))]
    Trainer(n_epochs=4, progress_bar=False, hooks=hooks).fit(*_setup())
    assert hooks[0].steps == list(range(3, 33, 3)) and hooks[0].epochs == []
    assert hooks[1].steps == [] and hooks[1].epochs == [2, 4]
    assert hooks[2].steps == hooks[2].epochs == []  # 0: never during the run
    assert Every.of(3, "epochs") == Every(3, "epoch") and Every.of(3, "steps").unit == "step"


def _setup(at: int = 0) -> tuple[MultitaskClassifier, list]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), Interrupt(at))
    model = MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    loaders = [
        make_loader("A", "train", {"x": x}, {"a": (x[:, 0] > 0).long()}, 16),
        make_loader("B", "train", {"x": x}, {"b": (x[:, 1] > 0).long()}, 16),
        make_loader("A", "valid", {"x": x[:32]}, {"a": (x[:32, 0] > 0).long()}, 16),
    ]
    return model, loaders


def test_hooks_fire_in_order_probe_evaluate_save(tmp_path: Path) -> None:
    config = {
        "n_epochs": 1,
        "progress_bar": False,
        "run_dir": str(tmp_path),
        "diagnostics": {"every": 4, "batch_size": 8},
        "evaluation_unit": "steps",
        "evaluation_freq": 4,
        "checkpoint_unit": "steps",
        "checkpoint_every": 4,
    }
    model, loaders = _setup(at=6)  # stops in step 6: last.pt is the one of step 4
    with pytest.raises(KeyboardInterrupt):
        Trainer(**config).fit(model, loaders)
    history = load_checkpoint(tmp_path)["run"]["history"]
    # at step 4 the probe's record comes first, then the evaluation's; the save sees both
    assert [r["step"] for r in history] == [4.0, 4.0]
    assert any(k.startswith("diagnostics/") for k in history[0])
    assert "a/A/valid/accuracy" in history[1] and "model/all/train/loss" in history[1]


def test_the_end_evaluates_once_and_saves(tmp_path: Path) -> None:
    model, loaders = _setup()
    trainer = Trainer(n_epochs=2, progress_bar=False, run_dir=str(tmp_path), evaluation_freq=2)
    trainer.fit(model, loaders)
    assert [r["step"] for r in trainer.history] == [16.0]  # epoch 2's evaluation; no repeat
    assert load_checkpoint(tmp_path)["run"]["progress"]["global_step"] == 16
    trainer = Trainer(n_epochs=2, progress_bar=False, evaluation_freq=0)
    trainer.fit(*_setup())
    assert [r["step"] for r in trainer.history] == [16.0]  # 0: only after training


# ---------------------------------------------------------------- the public Hook


class Counter(Hook):
    """Counts steps and evaluations; logs the count; remembers every event it saw."""

    name = "counter"

    def __init__(self, stop_at: int = 0) -> None:
        self.steps, self.evaluations, self.stop_at = 0, 0, stop_at
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, run: Run) -> None:
        self.events.append(("fit_start", run.global_step))

    def on_step_end(self, run: Run) -> None:
        self.steps += 1
        self.events.append(("step_end", run.global_step))
        run.log({"counter/steps": self.steps})
        if run.global_step == self.stop_at:
            run.stop("counted enough")

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        self.evaluations += 1
        self.events.append(("evaluate_end", run.global_step))
        run.log({"counter/evaluations": self.evaluations})  # joins the evaluation's record

    def on_epoch_end(self, run: Run) -> None:
        self.events.append(("epoch_end", run.epoch))

    def on_fit_end(self, run: Run) -> None:
        self.events.append(("fit_end", run.global_step))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "evaluations": self.evaluations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.evaluations = int(state["steps"]), int(state["evaluations"])


class Recorder(Hook):
    """Appends its name to a shared list at every event."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def on_step_end(self, run: Run) -> None:
        self.seen.append(self.name)

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        self.seen.append(f"{self.name}:eval")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_user_hook_counts_steps_and_its_count_survives_resume(tmp_path: Path) -> None:
    config = {"n_epochs": 2, "progress_bar": False, "checkpoint_every": 3}
    config |= {"checkpoint_unit": "steps", "evaluation_freq": 1}
    model, loaders = _setup()
    reference = Counter()
    Trainer(run_dir=str(tmp_path / "ref"), hooks=[reference], **config).fit(model, loaders)
    expected = _params(model)
    assert reference.steps == 16 and reference.evaluations == 2

    model, loaders = _setup(at=11)  # killed in step 11: last.pt is the one of step 9
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), hooks=[Counter()], **config).fit(model, loaders)
    assert load_checkpoint(tmp_path / "run")["hooks"]["counter"] == {"steps": 9, "evaluations": 1}
    model, loaders = _setup()
    resumed = Counter()
    trainer = Trainer(run_dir=str(tmp_path / "run"), hooks=[resumed], **config)
    trainer.fit(model, loaders, resume_from=tmp_path / "run")
    assert (resumed.steps, resumed.evaluations) == (16, 2)  # continued, not restarted
    assert resumed.events[0] == ("fit_start", 9)
    assert all(torch.equal(expected[k], v) for k, v in _params(model).items())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text()


def test_hooks_fire_in_the_documented_order(tmp_path: Path) -> None:
    seen: list[str] = []
    hooks = [Recorder("first", seen), Recorder("second", seen)]
    config = {"n_epochs": 1, "run_dir": str(tmp_path), "diagnostics": {"every": 8}}
    config |= {"evaluation_unit": "steps", "evaluation_freq": 8, "checkpoint_every": 1}
    Trainer(hooks=hooks, progress_bar=True, **config).fit(*_setup())
    # each step: first, second; the evaluation at step 8 fires both before their step_end
    assert seen[:9] == ["first", "second"] * 4 + ["first"]
    assert seen[14:18] == ["first:eval", "second:eval", "first", "second"]
    names = list(load_checkpoint(tmp_path)["hooks"])
    assert names == [
        "nonfinite",
        "diagnostics",
        "evaluation",
        "first",
        "second",
        "writers",
        "checkpoint",
        "progress",
    ]
    assert "nonfinite" in (hooks_module.__doc__ or "") and "progress" in (
        hooks_module.__doc__ or ""
    )


def test_two_hooks_of_one_name_get_distinct_checkpoint_keys(tmp_path: Path) -> None:
    hooks = [Counter(), Counter()]
    Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path), hooks=hooks).fit(*_setup())
    saved = load_checkpoint(tmp_path)["hooks"]
    assert saved["counter"] == saved["counter_2"] == {"steps": 8, "evaluations": 1}


def test_run_log_values_land_in_metrics_jsonl(tmp_path: Path) -> None:
    counter = Counter()
    trainer = Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path), hooks=[counter])
    trainer.fit(*_setup())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "counter/steps" in r]
    assert [(r["step"], r["counter/steps"]) for r in steps] == [(s, s) for s in range(1, 9)]
    evaluation = lines[-1]  # the epoch's evaluation: the value logged in on_evaluate_end joins it
    assert evaluation["counter/evaluations"] == 1 and "a/A/valid/accuracy" in evaluation
    assert lines == trainer.history


def test_run_stop_ends_the_run_cleanly(tmp_path: Path) -> None:
    counter = Counter(stop_at=5)
    trainer = Trainer(n_epochs=3, progress_bar=False, run_dir=str(tmp_path), hooks=[counter])
    trainer.fit(*_setup())
    assert trainer.global_step == 5 and counter.steps == 5
    assert counter.events[-2:] == [("evaluate_end", 5), ("fit_end", 5)]  # the final evaluation
    saved = load_checkpoint(tmp_path)
    assert saved["run"]["progress"]["global_step"] == 5
    assert saved["run"]["progress"]["stop_reason"] == "counted enough"
    # resuming a stopped run trains no further
    model, loaders = _setup()
    again = Counter()
    resumed = Trainer(n_epochs=3, progress_bar=False, run_dir=str(tmp_path), hooks=[again])
    resumed.fit(model, loaders, resume_from=tmp_path)
    assert resumed.global_step == 5 and again.steps == 5


# ---------------------------------------------------------------- EarlyStopping


def test_early_stopping_stops_a_run_whose_metric_plateaus(tmp_path: Path) -> None:
    stopper = EarlyStopping("a/A/valid/accuracy", patience=2)
    trainer = Trainer(n_epochs=10, lr=1e-9, progress_bar=False, hooks=[stopper])
    trainer.fit(*_setup())  # lr 1e-9: the accuracy never changes
    assert [r["step"] for r in trainer.history] == [8.0, 16.0, 24.0]  # best, then 2 without
    assert trainer.state.stop_reason is not None
    assert trainer.state.stop_reason.startswith("early stopping: a/A/valid/accuracy")
    assert stopper.mode == "max" and stopper.bad == 2


def test_early_stopping_lets_an_improving_run_finish() -> None:
    stopper = EarlyStopping("model/all/train/loss", patience=1)  # mode from the metric: min
    trainer = Trainer(n_epochs=4, lr=0.05, progress_bar=False, hooks=[stopper])
    trainer.fit(*_setup())
    losses = [r["model/all/train/loss"] for r in trainer.history]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4
    assert trainer.state.stop_reason is None and stopper.mode == "min"
    assert stopper.best == losses[-1]


def test_early_stopping_state_comes_back_on_resume(tmp_path: Path) -> None:
    config = {"n_epochs": 10, "lr": 1e-9, "progress_bar": False, "checkpoint_every": 1}
    reference = Trainer(hooks=[EarlyStopping("a/A/valid/accuracy", patience=3)], **config)
    reference.fit(*_setup())
    assert reference.global_step == 32
    model, loaders = _setup(at=20)  # killed in epoch 3: last.pt is epoch 2's
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            run_dir=str(tmp_path), hooks=[EarlyStopping("a/A/valid/accuracy", 3)], **config
        ).fit(model, loaders)
    assert load_checkpoint(tmp_path)["hooks"]["early_stopping"]["bad"] == 1
    stopper = EarlyStopping("a/A/valid/accuracy", patience=3)
    resumed = Trainer(run_dir=str(tmp_path), hooks=[stopper], **config)
    resumed.fit(*_setup(), resume_from=tmp_path)
    assert resumed.global_step == 32 and stopper.bad == 3
    assert resumed.history == reference.history


def test_early_stopping_metric_is_checked_before_training() -> None:
    trainer = Trainer(progress_bar=False, hooks=[EarlyStopping("a/A/valid/acuracy")])
    model, loaders = _setup()
    before = _params(model)
    with pytest.raises(ConfigError, match=r"EarlyStopping metric: 'a/A/valid/acuracy' .*did you"):
        trainer.fit(model, loaders)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())


# ---------------------------------------------------------------- hook specs


def test_hook_specs_by_name_mapping_and_dotted_path() -> None:
    spec = {"name": "early_stopping", "metric": "a/A/valid/accuracy", "patience": 2}
    path = {
        "name": "mtlgraph.training.early_stopping.EarlyStopping",
        "metric": "a/A/valid/accuracy",
    }
    trainer = Trainer(n_epochs=10, lr=1e-9, progress_bar=False, hooks=[spec, path])
    trainer.fit(*_setup())
    assert trainer.global_step == 24  # the patience-2 one stops the run


def test_trainer_hooks_in_yaml(tmp_path: Path) -> None:
    hooks = [{"name": "early_stopping", "metric": "model/all/train/loss", "patience": 1}]
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(hooks=hooks)))
    assert cfg.trainer.hooks == hooks
    exp = build_experiment(cfg)
    exp.trainer.fit(exp.model, exp.loaders)
    assert exp.trainer.global_step > 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("early_stoping", r"hooks\[0\]: unknown hook 'early_stoping' \(did you mean"),
        (
            {"name": "early_stopping", "metric": "m", "patiense": 2},
            r"hooks\[0\].patiense: hook 'early_stopping' takes no argument 'patiense' \(did",
        ),
        ({"name": "early_stopping"}, r"hooks\[0\].metric: missing \(required by hook 'early"),
        (
            {"name": "early_stopping", "metric": "m", "patience": 0},
            r"hooks\[0\]: EarlyStopping: patience must be an integer >= 1, got 0",
        ),
        (
            "mtlgraph.training.early_stopping.EarlyStoping",
            r"hooks\[0\]: cannot import .* has no 'EarlyStoping' \(did you mean 'EarlyStopping'",
        ),
        ("mtlgraph.training.Trainer", r"hooks\[0\]: .* is the class Trainer, not a Hook subclass"),
    ],
)
def test_bad_hook_specs_name_the_key(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(hooks=[spec])


def test_hook_specs_in_yaml_name_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config(hooks=["early_stoping"]))
    with pytest.raises(ConfigError, match=r"hooks\[0\]: unknown hook 'early_stoping'"):
        load_config(path)


def test_a_hook_attribute_named_every_that_is_no_trigger_is_refused() -> None:
    class Counter(Hook):
        def __init__(self) -> None:
            self.every = 2  # the user's own setting, colliding with Hook.every

        def on_step_end(self, run: Any) -> None:
            pass

    with pytest.raises(ConfigError, match=r"hook 'Counter': every is 2, but it is the hook's"):
        Trainer(n_epochs=1, progress_bar=False, hooks=[Counter()]).fit(*_setup())
    with pytest.raises(ConfigError, match="unit must be 'step' or 'epoch', got 'steps'"):
        Every(2, "steps")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n must be an integer >= 0, got -1"):
        Every(-1, "step")
