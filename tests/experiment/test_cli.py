"""The command line: exit codes, messages, train -> evaluate round trip, run directories, and
exact resume of a training process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from experiment_helpers import ROOT, cli_command, cli_env, tiny_config, write_config

from mtlgraph import ConfigError, __version__
from mtlgraph.experiment.cli import COMMANDS, _is_usage_error, main, new_run_dir, score_table
from mtlgraph.experiment.config import load_config


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _tiny(tmp_path: Path, **trainer: object) -> Path:
    cfg = tiny_config(**trainer)
    cfg["runs_root"] = str(tmp_path / "runs")
    return write_config(tmp_path / "tiny.yaml", cfg)


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert (code, out.strip()) == (0, f"mtlgraph {__version__}")
    code, _, err = _run(capsys)
    assert code == 2 and "required: COMMAND" in err
    code, _, err = _run(capsys, "train")
    assert code == 2 and "the following arguments are required: config" in err
    code, _, err = _run(capsys, "check", "x.yaml", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_usage_errors_are_mtlgraph_yaml_and_missing_file_errors() -> None:
    assert _is_usage_error(ConfigError(["x: bad"]))
    assert _is_usage_error(yaml.YAMLError("bad"))
    assert _is_usage_error(FileNotFoundError("gone"))
    assert not _is_usage_error(RuntimeError("a module failed"))


def test_subcommands_are_a_registry() -> None:
    assert list(COMMANDS) == [
        "train", "evaluate", "check", "diagnose", "predict", "export",
        "report", "compare", "baselines", "sweep",
    ]  # fmt: skip


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        cli_command("--version"), env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert (out.returncode, out.stdout.strip()) == (0, f"mtlgraph {__version__}")


def test_check_prints_the_merged_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "check", str(_tiny(tmp_path)))
    assert code == 0, err
    assert out.startswith(f"{tmp_path / 'tiny.yaml'}: valid\n")
    lines = out.splitlines()
    trunk = next(ln for ln in lines if ln.strip().startswith("trunk "))
    assert "shared by circle_task, square_task" in trunk
    head = next(ln for ln in lines if ln.strip().startswith("circle_head "))
    assert "used by circle_task" in head
    assert "    trunk = trunk(_input_['xy'])" in lines
    assert "  circles: train 160, valid 20, test 20; labels circle_task" in lines
    assert not (tmp_path / "runs").exists()  # check writes nothing


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_checks(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "check", str(path), "--quiet")
    assert code == 0, err
    assert out.startswith(f"{path}: valid") and "shared by" in out


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_trains(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each seed story's config runs through the CLI (one epoch) and scores every task."""
    from mtlgraph.experiment.config import load_config

    run = tmp_path / "run"
    code, out, err = _run(
        capsys, "train", str(path), "trainer.n_epochs=1", f"trainer.run_dir={run}", "--quiet"
    )
    assert code == 0, err
    scores = json.loads((run / "scores.json").read_text())
    tasks = set(load_config(path).tasks)
    assert {key.split("/")[0] for key in scores} == tasks
    assert json.loads(out) == scores


def test_config_error_exits_2_with_one_clean_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tiny(tmp_path, lrr=0.1)
    code, out, err = _run(capsys, "train", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"mtlgraph: error: invalid config '{path}' (1 problem):\n")
    assert "trainer.lrr: unknown key (did you mean 'lr'?)" in err
    assert "Traceback" not in err and "(run with --debug for the traceback)" in err
    code, _, err = _run(capsys, "check", str(path), "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        (
            {"optimizer": {"name": "adamw", "amsgrad": "maybe"}},
            "trainer.optimizer.amsgrad: expected true or false, got the string 'maybe'",
        ),
        (
            {"optimizer": {"name": "adamw", "betas": 0.9}},
            "trainer.optimizer.betas: expected a list of 2, got float 0.9",
        ),
        (
            {"batch_scheduler": {"name": "weighted", "weights": [1, 2]}},
            "trainer.batch_scheduler.weights: expected a mapping, got list [1, 2]",
        ),
        (
            {"batch_scheduler": {"name": "weighted", "weights": {"circles": 1}}},
            "batch_scheduler: weights has no entry for dataset 'squares'",
        ),
        (
            {"optimizer": {"name": "sgd", "weight_decay": 5.0}},
            "trainer.optimizer.weight_decay: optimizer 'sgd' gets 'weight_decay' from mtlgraph; "
            "set it once, as trainer.weight_decay",
        ),
    ],
)
def test_component_arguments_of_the_wrong_type_exit_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trainer: dict[str, object], message: str
) -> None:
    code, _, err = _run(capsys, "train", str(_tiny(tmp_path, **trainer)))
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not list((tmp_path / "runs").rglob("*.pt"))


def test_bad_override_and_missing_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "check", str(_tiny(tmp_path)), "trainer.n_epochs=many")
    assert (
        code == 2
        and "(override 'trainer.n_epochs=many'): trainer.n_epochs: expected an integer" in err
    )
    code, _, err = _run(capsys, "check", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml: no such config file" in err
    code, _, err = _run(capsys, "train", str(_tiny(tmp_path)), "--resume", str(tmp_path / "nope"))
    assert code == 2 and "no such run directory" in err
    (tmp_path / "empty_run").mkdir()
    code, _, err = _run(
        capsys, "train", str(_tiny(tmp_path)), "--resume", str(tmp_path / "empty_run")
    )
    assert code == 2 and "no checkpoint in directory" in err


_FAILING = """
import torch
from torch import nn
from mtlgraph.graph import MODULES

class FailsInTraining(nn.Module):
    def forward(self, x):
        if self.training:
            raise RuntimeError("the user module failed")
        return x

MODULES.register("fails_in_training_clitest", FailsInTraining)
"""


def test_runtime_failure_exits_1_and_keeps_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "failing_clitest.py").write_text(_FAILING)
    cfg = tiny_config()
    cfg["runs_root"] = str(tmp_path / "runs")
    cfg["imports"] = ["failing_clitest"]
    cfg["modules"]["gate"] = {"type": "fails_in_training_clitest"}
    for task in cfg["tasks"].values():
        task["ops"].insert(1, {"module": "gate", "inputs": ["trunk"]})
        task["ops"][2]["inputs"] = ["gate"]
    path = write_config(tmp_path / "f.yaml", cfg)
    code, _, err = _run(capsys, "train", str(path), "--quiet")
    assert code == 1
    assert err.startswith("mtlgraph: error: RuntimeError: the user module failed")
    assert "operation 'gate' (module 'gate')" in err  # the note names the culprit
    assert "the run directory is" in err and "Traceback" not in err


def test_train_then_evaluate_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _tiny(
        tmp_path,
        checkpoint_every=1,
        checkpoint_metric="circle_task/circles/valid/accuracy",
    )
    code, out, err = _run(capsys, "train", str(path), "trainer.n_epochs=3", "--quiet")
    assert code == 0, err
    assert err == ""  # --quiet: no logs, no progress bars
    scores = json.loads(out)
    run_dirs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(run_dirs) == 1
    run = run_dirs[0]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "scores.json",
    ]
    assert len(list(run.glob("events.out.tfevents.*"))) >= 1
    assert json.loads((run / "scores.json").read_text()) == scores
    assert set(scores) == {
        f"{t}/{d}/{s}/accuracy"
        for t, d in (("circle_task", "circles"), ("square_task", "squares"))
        for s in ("train", "valid", "test")
    }
    # the resolved config reloads to the config that ran (overrides and run_dir included)
    resolved = load_config(run / "config.yaml")
    assert resolved.trainer.n_epochs == 3 and resolved.trainer.run_dir is None
    assert resolved.tasks == load_config(path).tasks
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.pt"}

    # evaluate the final weights: the same scores as training printed
    code, out, err = _run(
        capsys, "evaluate", str(path), "--checkpoint", str(run / "checkpoints" / "last.pt")
    )
    assert code == 0, err
    evaluated = json.loads((run / "evaluation-last.json").read_text())
    assert evaluated == pytest.approx(scores)
    assert out.splitlines()[0].split() == ["task", "dataset", "metric", "train", "valid", "test"]
    assert out == score_table(evaluated) + "\n"
    # a run directory means its best.pt; --split and --output
    code, out, _ = _run(
        capsys,
        "evaluate",
        str(path),
        "--checkpoint",
        str(run),
        "--split",
        "test",
        "--output",
        str(tmp_path / "e.json"),
    )
    assert code == 0
    assert set(json.loads((tmp_path / "e.json").read_text())) == {
        "circle_task/circles/test/accuracy",
        "square_task/squares/test/accuracy",
    }
    # cross-task evaluation: square data through the circle head
    code, out, _ = _run(
        capsys,
        "evaluate",
        str(path),
        "--checkpoint",
        str(run),
        "--split",
        "valid",
        "--remap",
        "square_task=circle_task",
        "--output",
        str(tmp_path / "x.json"),
    )
    assert code == 0
    assert "circle_task/squares/valid/accuracy" in json.loads((tmp_path / "x.json").read_text())
    code, _, err = _run(capsys, "evaluate", str(path), "--checkpoint", str(run), "--remap", "x")
    assert code == 2 and "expected LABEL=TASK" in err


def test_resuming_a_finished_run_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _tiny(tmp_path)
    assert _run(capsys, "train", str(path), "--quiet")[0] == 0
    run = next((tmp_path / "runs" / "tiny").iterdir())
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    code, out, _ = _run(capsys, "train", str(path), "--resume", str(run), "--quiet")
    assert code == 0
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert json.loads(out) == json.loads((run / "scores.json").read_text())


def test_new_run_dir_never_reuses_a_directory(tmp_path: Path) -> None:
    import datetime

    now = datetime.datetime(2025, 1, 2, 3, 4, 5)
    a = new_run_dir(tmp_path, "exp/one", now)
    b = new_run_dir(tmp_path, "exp/one", now)
    assert a == tmp_path / "exp_one" / "20250102-030405"
    assert b == tmp_path / "exp_one" / "20250102-030405-1"


# ---------------------------------------------------------------- SIGKILL and exact resume


_BLOCKER = """
import os, pathlib, time
from torch import nn
from mtlgraph.graph import MODULES

class BlockAfterCheckpoint(nn.Module):
    '''Identity. With $BLOCK_AFTER set: once that file exists, N training calls later, hang.'''

    def __init__(self, calls_after: int = 5):
        super().__init__()
        self.calls_after, self.seen = calls_after, 0

    def forward(self, x):
        target = os.environ.get("BLOCK_AFTER")
        if target and self.training and pathlib.Path(target).exists():
            self.seen += 1
            if self.seen > self.calls_after:
                pathlib.Path(target + ".blocked").write_text("blocked")
                time.sleep(600)
        return x

MODULES.register("block_after_checkpoint", BlockAfterCheckpoint)
"""


def _resume_config(tmp_path: Path) -> Path:
    (tmp_path / "blocker_clitest.py").write_text(_BLOCKER)
    cfg = tiny_config(
        n_epochs=2,
        lr_scheduler="cosine",
        warmup_steps=3,
        evaluation_unit="steps",
        evaluation_freq=4,
        checkpoint_every=3,
        checkpoint_unit="steps",
        checkpoint_metric="square_task/squares/valid/accuracy",
    )
    cfg["imports"] = ["blocker_clitest"]
    cfg["data"]["shuffle"] = True  # shuffled loaders, and the default shuffled batch scheduler
    cfg["modules"]["trunk"]["dropout"] = 0.2  # draws from torch's generator every step
    cfg["modules"]["gate"] = {"type": "block_after_checkpoint", "calls_after": 2}
    for task in cfg["tasks"].values():
        task["ops"].insert(1, {"module": "gate", "inputs": ["trunk"]})
        task["ops"][2]["inputs"] = ["gate"]
    return write_config(tmp_path / "resume.yaml", cfg)


@pytest.mark.slow
def test_sigkilled_training_resumes_bit_identically(tmp_path: Path) -> None:
    config = _resume_config(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = cli_env()
    common = ["--quiet"]
    done = subprocess.run(
        cli_command("train", str(config), f"trainer.run_dir={ref}", *common),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr

    last = run / "checkpoints" / "last.pt"
    proc = subprocess.Popen(
        cli_command("train", str(config), f"trainer.run_dir={run}", *common),
        env={**env, "BLOCK_AFTER": str(last)},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    blocked = Path(f"{last}.blocked")
    while not blocked.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the training process never reached the block"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(last, weights_only=True)
    assert state["run"]["progress"]["global_step"] == 3  # killed 2 steps after the first checkpoint
    assert 0 < state["run"]["progress"]["step_in_epoch"] < 20  # mid-epoch
    assert not (run / "scores.json").exists()

    resumed = subprocess.run(
        cli_command("train", str(config), "--resume", str(run), *common),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (
        a["run"]["history"] == b["run"]["history"] and a["run"]["progress"] == b["run"]["progress"]
    )
    assert (ref / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert json.loads((ref / "scores.json").read_text()) == json.loads(
        (run / "scores.json").read_text()
    )
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["run_dir"] == str(run)


@pytest.mark.slow
def test_quickstart_reaches_the_tutorials_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "train", str(ROOT / "configs" / "quickstart.yaml"), "--quiet")
    assert code == 0, err
    scores = json.loads(out)
    tests = {k: v for k, v in scores.items() if "/test/" in k}
    assert len(tests) == 3 and all(v >= 0.9 for v in tests.values()), tests
    assert list((tmp_path / "runs" / "quickstart").iterdir())
