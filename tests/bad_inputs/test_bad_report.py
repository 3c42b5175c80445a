"""Bad-input corpus of report, compare, sweep and check --graph: each case exits with the status
docs/cli.md promises (2: a usage error) and names the culprit in one message."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from experiment_helpers import TINY, tiny_config, write_config

from mtlgraph.experiment.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _finished(path: Path, tasks: list[str]) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["tasks"] = {t: cfg["tasks"][t] for t in tasks}
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    scores = {f"{t}/d/test/accuracy": 0.5 for t in tasks}
    (path / "metrics.jsonl").write_text(json.dumps(scores) + "\n")
    (path / "scores.json").write_text(json.dumps(scores))
    return path


def test_report_of_a_directory_without_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, "report", str(tmp_path))
    assert code == 2
    assert f"{tmp_path}: not a run directory: no metrics.jsonl" in err


def test_compare_runs_of_different_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _finished(tmp_path / "a", ["circle_task", "square_task"])
    b = _finished(tmp_path / "b", ["circle_task"])
    code, err = _run(capsys, "compare", str(a), str(b))
    assert code == 2
    assert "runs of different tasks cannot be compared" in err
    assert f"{b}: tasks circle_task" in err


def test_compare_a_run_that_did_not_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished(tmp_path / "a", ["circle_task"])
    (run / "scores.json").unlink()
    code, err = _run(capsys, "compare", str(run))
    assert code == 2 and "not a finished run directory: no scores.json" in err


def test_compare_a_glob_that_matches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, "compare", str(tmp_path / "nothing-*"))
    assert code == 2 and "nothing-*: no run directory matches" in err


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("trainer.lrr=0.1,0.2", "trainer.lrr: unknown key (did you mean 'lr'?)"),
        ("trainer.lr=0.1,fast", "trainer.lr: expected a number, got the string 'fast'"),
        ("trainer.lr", "--grid trainer.lr: expected KEY=V1,V2,..."),
    ],
)
def test_sweep_grid_errors_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], grid: str, message: str
) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config())
    out = tmp_path / "out"
    code, err = _run(capsys, "sweep", str(config), "--grid", grid, "--out", str(out))
    assert code == 2 and message in err
    assert not out.exists()  # nothing ran


def test_sweep_bad_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config())
    code, err = _run(capsys, "sweep", str(config), "--shard", "2/2", "--out", str(tmp_path))
    assert code == 2 and "--shard 2/2: expected i/n with 0 <= i < n" in err


def test_check_graph_with_an_unknown_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_config())
    code, err = _run(capsys, "check", str(config), "--graph", str(tmp_path / "g.png"))
    assert code == 2 and "unknown picture format '.png'; use one of" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optuna", "2"], "--optuna needs --objective KEY"),
        (
            ["--optuna", "2", "--objective", "circle_task/circles/valid/acc"],
            "not a key the runs log",
        ),
    ],
)
def test_sweep_optuna_objective_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    pytest.importorskip("optuna")
    config = write_config(tmp_path / "c.yaml", tiny_config())
    grid = ["--grid", "trainer.lr=0.05,0.1", "--out", str(tmp_path / "o")]
    code, err = _run(capsys, "sweep", str(config), *grid, *extra)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()
