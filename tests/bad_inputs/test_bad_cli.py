"""Bad-input corpus, YAML and command line: every case asserts the exit status of
docs/cli.md's table (0 ok, 1 run-time failure, 2 usage/config, 130 interrupted) AND that stderr
names the culprit, in one clean message without a traceback."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from experiment_helpers import tiny_config, write_config

from mtlgraph.experiment.cli import main, score_table


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _npz(path: Path, n: int = 60, **arrays: np.ndarray) -> Path:
    g = np.random.default_rng(0)
    x = g.uniform(-1.5, 1.5, size=(n, 2))
    base = {"x": x, "y": (np.linalg.norm(x, axis=1) < 1).astype(np.int64)}
    np.savez(path, **{**base, **arrays})
    return path


def _file_config(tmp_path: Path, npz: str = "p.npz", **trainer: Any) -> dict[str, Any]:
    cfg = tiny_config(**trainer)
    cfg["runs_root"] = str(tmp_path / "runs")
    cfg["data"]["datasets"] = {
        "points": {
            "source": {"type": "table", "path": npz, "fractions": {"train": 0.8, "valid": 0.2}},
            "fields": {"xy": "x"},
            "labels": {"circle_task": "y"},
        }
    }
    return cfg


SICK_TRUNK = """
import torch


class SickTrunk(torch.nn.Module):
    \"\"\"The tiny trunk, but NaN for a row whose first feature is 99 (a sick example).\"\"\"

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(in_dim, hidden[0])

    def forward(self, x):
        return torch.where(x[:, :1] == 99.0, torch.nan, torch.relu(self.linear(x)))
"""


def _sick_trunk(tmp_path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` whose trunk gives NaN on rows whose first feature is 99 (data files refuse NaN
    cells, so a non-finite loss comes from the model)."""
    (tmp_path / "sick_trunk.py").write_text(SICK_TRUNK)
    cfg["imports"] = ["sick_trunk"]
    cfg["modules"]["trunk"]["type"] = "sick_trunk.SickTrunk"
    return cfg


def _config(tmp_path: Path, cfg: dict[str, Any] | str, name: str = "c.yaml") -> str:
    return str(write_config(tmp_path / name, cfg))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One finished run of the tiny config: (config file, run directory)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(n_epochs=1)
    cfg["runs_root"] = str(tmp / "runs")
    config = write_config(tmp / "tiny.yaml", cfg)
    assert main(["train", str(config), "--quiet"]) == 0
    return config, next((tmp / "runs" / "tiny").iterdir())


# ---------------------------------------------------------------- config and data (exit 2)


def _with(path: str, value: Any) -> dict[str, Any]:
    cfg = tiny_config()
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return cfg


CONFIG_CASES: list[tuple[str, Any, str]] = [
    ("unknown trainer key", _with("trainer.n_epoch", 3), r"trainer.n_epoch: unknown key \(did you mean 'n_epochs'\?\)"),
    ("nonfinite value", _with("trainer.nonfinite", "ignore"), r"trainer.nonfinite"),
    ("metric kwarg", _with("tasks.circle_task.metrics", [{"name": "fbeta", "betta": 2}]), r"tasks.circle_task.metrics\[0\].betta: metric 'fbeta' takes no argument 'betta' \(did you mean 'beta'\?\)"),
    ("optimizer bool", _with("trainer.optimizer", {"name": "adamw", "amsgrad": "maybe"}), r"trainer.optimizer.amsgrad: expected true or false, got the string 'maybe'"),
    ("optimizer pair", _with("trainer.optimizer", {"name": "adamw", "betas": 0.9}), r"trainer.optimizer.betas: expected a list of 2, got float 0\.9"),
    ("optimizer weight_decay", _with("trainer.optimizer", {"name": "sgd", "weight_decay": 5.0}), r"trainer.optimizer.weight_decay: optimizer 'sgd' gets 'weight_decay' from mtlgraph; set it once, as trainer.weight_decay"),
    ("scheduler weights", _with("trainer.batch_scheduler", {"name": "weighted", "weights": [1, 2]}), r"trainer.batch_scheduler.weights: expected a mapping, got list \[1, 2\]"),
    ("module kwarg", _with("modules.trunk.hiden", [8]), r"modules.trunk.hiden: module type 'mlp' takes no argument 'hiden'"),
    ("unknown module type", _with("modules.trunk.type", "mpl"), r"modules.trunk.type: unknown module type 'mpl' \(did you mean 'mlp'\?\)"),
    ("unknown loss", _with("tasks.circle_task.loss", "cross_entropi"), r"tasks.circle_task.loss: unknown loss 'cross_entropi'"),
    ("scheduler kwarg", _with("trainer.batch_scheduler", {"name": "shuffled", "sed": 1}), r"batch scheduler 'shuffled' takes no argument 'sed'"),
    ("lr schedule kwarg", _with("trainer.lr_scheduler", {"name": "cosine", "min_factr": 0.1}), r"LR schedule 'cosine' takes no argument 'min_factr'"),
    ("balancer kwarg", _with("trainer.balancer", {"name": "uncertainty", "lrr": 1}), r"balancer 'uncertainty' takes no argument 'lrr'"),
    ("writer name", _with("trainer.writers", ["jsnl"]), r"unknown writer 'jsnl' \(did you mean 'jsonl'\?\)"),
    ("generator arg", _with("data.datasets.circles.source.args", {"n": 100, "sed": 0}), r"data.datasets.circles.source.args.sed"),
    ("label of no task", _with("data.datasets.circles.labels", {"circle_tsk": "y"}), r"data.datasets.circles.labels.circle_tsk: labels name tasks, and there is no task 'circle_tsk'"),
    ("empty file", "", r"the file is empty"),
    ("yaml syntax", "trainer: [1, 2\n", r"c.yaml"),
    ("checkpoint metric", _with("trainer.checkpoint_metric", "circle_task/circles/valid/acc"), r"trainer.checkpoint_metric: 'circle_task/circles/valid/acc' is not a key this training logs \(did you mean 'circle_task/circles/valid/accuracy'\?\)"),
]  # fmt: skip


@pytest.mark.parametrize(("cfg", "message"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])  # fmt: skip
def test_bad_configs_exit_2_in_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg: Any, message: str
) -> None:
    code, _, err = _run(capsys, "check", _config(tmp_path, cfg))
    assert code == 2
    assert err.startswith("mtlgraph: error: ")
    assert re.search(message, err), err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "check", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: no such config file" in err


def test_bad_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "check", _config(tmp_path, tiny_config()), "trainer.lr=-1")
    assert code == 2 and "trainer.lr: must be a positive number, got -1" in err


DATA_CASES: list[tuple[str, dict[str, np.ndarray], dict[str, Any], str]] = [
    ("class id out of range", {"y": np.arange(60) % 3}, {}, r"data.datasets.points.labels.circle_task: column 'y' of '.*p.npz' \(train split\) for task 'circle_task': label 2 \(row 2; \d+ more\) is outside 0..1: the head outputs 2 classes"),
    ("-100 labels", {"y": np.where(np.arange(60) % 5 == 0, -100, 1)}, {}, r"label -100 .* not the task's ignore value \(-1\); set Task\(ignore_value=-100\)"),
    ("binary head with 2 outputs", {}, {"tasks.circle_task.task_type": "binary"}, r"for task 'circle_task': the head of binary task 'circle_task' outputs 2 values; a binary task needs one logit"),
    ("fractional labels", {"y": np.tile([0.0, 0.5], 30)}, {}, r"data.datasets.points.labels.circle_task: '.*p.npz' row 2, column 'y': 0.5 is not a class id"),
    ("nan feature", {"x": np.where(np.arange(120).reshape(60, 2) == 41, np.nan, 0.5)}, {}, r"data.datasets.points.fields.xy: '.*p.npz' row 21, column 'x': \[0.5, nan\] is not a finite number"),
    ("absent array", {}, {"data.datasets.points.labels": {"circle_task": "yy"}}, r"data.datasets.points.labels.circle_task: .*'yy'"),
    ("missing file", {}, {"data.datasets.points.source.path": "nope.npz"}, r"data.datasets.points.source.path: file '.*nope.npz' does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("arrays", "changes", "message"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])  # fmt: skip
def test_bad_data_exit_2_in_check_and_train(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arrays: dict[str, np.ndarray],
    changes: dict[str, Any],
    message: str,
) -> None:
    _npz(tmp_path / "p.npz", **arrays)
    cfg = _file_config(tmp_path)
    for key, value in changes.items():
        node = cfg
        *head, last = key.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    config = _config(tmp_path, cfg)
    for command in ("check", "train"):
        code, _, err = _run(capsys, command, config, "--quiet")
        assert code == 2, err
        assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


# ---------------------------------------------------------------- run-time failures (exit 1)


def test_nan_feature_exits_1_naming_task_dataset_epoch_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(0).uniform(-1.5, 1.5, size=(60, 2))
    x[20, 0] = 99.0
    _npz(tmp_path / "p.npz", x=x)
    cfg = _sick_trunk(tmp_path, _file_config(tmp_path))
    code, out, err = _run(capsys, "train", _config(tmp_path, cfg), "--quiet")
    assert code == 1
    assert "mtlgraph: error: non-finite loss at epoch 1, step 2: task 'circle_task' on dataset 'points' has loss nan" in err  # fmt: skip
    assert "the run directory is" in err and out == ""


def test_eval_splits_matching_no_loader_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(eval_splits=["vaild"])
    cfg["runs_root"] = str(tmp_path / "runs")
    code, _, err = _run(capsys, "train", _config(tmp_path, cfg), "--quiet")
    assert code == 2 and "eval_splits: no loader has split 'vaild' (did you mean 'valid'?)" in err


# ---------------------------------------------------------------- checkpoints and resume


def test_evaluate_with_a_checkpoint_of_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path]
) -> None:
    _, run = trained
    cfg = _with("modules.circle_head.out_features", 3)
    code, _, err = _run(capsys, "evaluate", _config(tmp_path, cfg), "--checkpoint", str(run))
    assert code == 2
    assert "is from another model: 'module_pool.circle_head.weight' has shape (2, 8) in the file, (3, 8) in the model" in err  # fmt: skip


def test_evaluate_with_renamed_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path]
) -> None:
    _, run = trained
    cfg = tiny_config()
    cfg["tasks"]["ring_task"] = cfg["tasks"].pop("circle_task")
    cfg["data"]["datasets"]["circles"]["labels"] = {"ring_task": "y"}
    code, _, err = _run(capsys, "evaluate", _config(tmp_path, cfg), "--checkpoint", str(run))
    assert code == 2 and "not in the model: 'circle_task'" in err


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04"], ids=["empty", "text", "zip"])
def test_evaluate_with_a_corrupt_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    config = _config(tmp_path, tiny_config())
    code, _, err = _run(capsys, "evaluate", config, "--checkpoint", str(tmp_path / "bad.pt"))
    assert code == 2
    assert f"not an mtlgraph checkpoint, or a truncated or corrupt file ({len(content)} bytes)" in err  # fmt: skip


def test_evaluate_missing_checkpoint_and_bad_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path]
) -> None:
    config, run = trained
    code, _, err = _run(capsys, "evaluate", str(config), "--checkpoint", str(tmp_path / "x.pt"))
    assert code == 2 and "--checkpoint" in err and "x.pt" in err
    code, _, err = _run(
        capsys, "evaluate", str(config), "--checkpoint", str(run), "--split", "tset"
    )
    assert code == 2 and "--split tset: the config has splits test, train, valid" in err
    code, _, err = _run(capsys, "evaluate", str(config), "--checkpoint", str(run), "--remap", "x")
    assert code == 2 and "--remap x: expected LABEL=TASK" in err


def test_evaluate_prints_small_numbers_readably() -> None:
    table = score_table({"t/d/test/mse": 4.7e-05, "t/d/test/r2": 0.99991})
    assert "4.7e-05" in table and "0.9999" in table and "0.0000" not in table


def test_resume_with_another_model_is_refused_before_touching_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path]
) -> None:
    _, run = trained
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = _with("modules.circle_head.out_features", 3)
    cfg["trainer"]["lr"] = 0.5  # and a few other keys that differ
    code, _, err = _run(capsys, "train", _config(tmp_path, cfg), "--resume", str(run), "--quiet")
    assert code == 2
    assert err.startswith(f"mtlgraph: error: cannot resume {run}: the config changes what a run")
    assert "modules.circle_head.out_features: the run has 2, this config 3" in err
    assert "trainer.lr" not in err  # a key the resume applies
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_resume_of_a_missing_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    config = _config(tmp_path, tiny_config())
    code, _, err = _run(capsys, "train", config, "--resume", str(tmp_path / "nope"))
    assert code == 2 and "--resume" in err and "no such run directory" in err


def test_resume_of_a_finished_run_says_it_is_finished(
    capsys: pytest.CaptureFixture[str], trained: tuple[Path, Path]
) -> None:
    config, run = trained
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = _run(capsys, "train", str(config), "--resume", str(run), "--quiet")
    assert code == 0
    assert f"{run} is a finished run (1 of 1 epochs): nothing to resume" in err
    assert "resuming at epoch" not in err
    assert json.loads(out) == json.loads((run / "scores.json").read_text())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------- run directories and signals


def test_run_config_reruns_from_another_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _npz(tmp_path / "p.npz")
    config = _config(tmp_path, _file_config(tmp_path, n_epochs=1))
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, "train", "c.yaml", "--quiet")[0] == 0
    run = next((tmp_path / "runs" / "tiny").iterdir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = _run(capsys, "check", str(run / "config.yaml"))
    assert code == 0, err
    assert str(tmp_path / "p.npz") in (run / "config.yaml").read_text()
    assert Path(config).exists()


def test_ctrl_c_before_any_checkpoint_offers_no_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtlgraph.training.trainer import Trainer

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    cfg = tiny_config()
    cfg["runs_root"] = str(tmp_path / "runs")
    config = _config(tmp_path, cfg)
    code, _, err = _run(capsys, "train", config, "--quiet", "trainer.lr=0.1")
    run = next((tmp_path / "runs" / "tiny").iterdir())
    assert code == 130
    assert err.strip() == "mtlgraph: interrupted (Ctrl-C)"  # nothing saved: nothing to resume
    assert not (run / "checkpoints" / "last.pt").exists()


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no file descriptor")


def test_closed_stdout_pipe_ends_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, trained: tuple[Path, Path]
) -> None:
    config, run = trained
    with capsys.disabled():
        monkeypatch.setattr("sys.stdout", _ClosedPipe())
        err = io.StringIO()
        monkeypatch.setattr("sys.stderr", err)
        code = main(["evaluate", str(config), "--checkpoint", str(run), "--quiet"])
    assert code == 0
    assert "Traceback" not in err.getvalue() and "BrokenPipe" not in err.getvalue()


def test_nonfinite_skip_batch_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).uniform(-1.5, 1.5, size=(60, 2))
    x[20, 0] = 99.0
    _npz(tmp_path / "p.npz", x=x[:, :])
    cfg = _sick_trunk(tmp_path, _file_config(tmp_path, n_epochs=1, nonfinite="skip_batch"))
    cfg["data"]["datasets"]["points"]["source"]["fractions"] = {"train": 1.0}
    cfg["trainer"]["eval_splits"] = []
    code, _, err = _run(capsys, "train", _config(tmp_path, cfg), "--quiet")
    assert code == 0, err
    run = next((tmp_path / "runs" / "tiny").iterdir())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["model/all/train/skipped_batches"] == 1
    assert all(torch.isfinite(v).all() for v in torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"].values())  # fmt: skip
    assert os.path.exists(run / "scores.json")
