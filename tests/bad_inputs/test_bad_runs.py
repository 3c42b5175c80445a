"""Bad-input corpus, runs: interrupted runs, reused and locked run directories, resumes that
change settings, a full disk. Every case asserts the exit status docs/cli.md promises (0 ok,
1 run-time failure, 2 usage/config, 130 SIGINT, 143 SIGTERM) and the message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from experiment_helpers import tiny_config, write_config

from mtlgraph.experiment.cli import main
from mtlgraph.experiment.run_dir import LOCK_FILE, RunLock


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 1-epoch run of the tiny config in a fixed run directory: (config, run)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(n_epochs=1, checkpoint_metric="circle_task/circles/valid/accuracy")
    config = write_config(tmp / "tiny.yaml", cfg)
    run = tmp / "run"
    assert main(["train", str(config), f"trainer.run_dir={run}", "--quiet"]) == 0
    return config, run


# ---------------------------------------------------------------- resumes that change settings


REFUSED: list[tuple[str, str]] = [
    ("trainer.optimizer=sgd", r"trainer.optimizer: the run has 'adam', this config 'sgd'"),
    ("trainer.balancer=uncertainty", r"trainer.balancer: the run has 'sum', this config"),
    ("trainer.batch_scheduler=sequential", r"trainer.batch_scheduler: the run has 'shuffled'"),
    ("trainer.seed=3", r"trainer.seed: the run has 0, this config 3"),
    ("trainer.grad_accumulation_steps=2", r"trainer.grad_accumulation_steps: the run has 1"),
    ("trainer.freeze=[circle_head]", r"trainer.freeze: the run has \[\], this config"),
    ("trainer.train_split=valid", r"trainer.train_split: the run has 'train'"),
    ("trainer.steps_per_epoch=5", r"trainer.steps_per_epoch: the run has None, this config 5"),
    ("trainer.diagnostics.every=2", r"trainer.diagnostics: the run has None"),
    ("trainer.param_groups.circle_head.lr=0.1", r"trainer.param_groups: the run has \[\]"),
    ("seed=5", r"seed: the run has 0, this config 5"),
    ("modules.trunk.hidden=[16]", r"modules.trunk.hidden: the run has \[8\], this config \[16\]"),
    ("tasks.circle_task.weight=2.0", r"tasks.circle_task.weight: the run has 1.0, this config 2.0"),
    ("data.batch_size=8", r"data.batch_size: the run has 16, this config 8"),
    ("data.seed=4", r"data.seed: the run has 0, this config 4"),
    ("data.datasets.circles.source.args.n=100", r"data.datasets.circles.source.args.n: the run"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_a_resume_that_changes_what_a_run_cannot_change_is_refused(
    capsys: pytest.CaptureFixture[str], finished: tuple[Path, Path], override: str, message: str
) -> None:
    config, run = finished
    files = _files(run)
    code, out, err = _run(capsys, "train", str(config), override, "--resume", str(run), "--quiet")
    assert code == 2, err
    assert f"cannot resume {run}: the config changes what a run cannot change" in err
    assert re_search(message, err)
    assert "resume with these keys as the run had them, or start a new run" in err
    assert out == "" and _files(run) == files  # nothing touched, no lock left behind


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


APPLIED: list[tuple[str, str]] = [
    ("trainer.lr=0.2", "trainer.lr"),
    ("trainer.weight_decay=0.01", "trainer.weight_decay"),
    ("trainer.evaluation_freq=2", "trainer.evaluation_freq"),
    ("trainer.checkpoint_every=3", "trainer.checkpoint_every"),
    ("trainer.optimizer.name=adam", "trainer.optimizer"),
    ("trainer.grad_clip=1.0", "trainer.grad_clip"),
    ("data.num_workers=0", ""),  # the same value: nothing to say
]


@pytest.mark.parametrize(("override", "key"), APPLIED, ids=[o for o, _ in APPLIED])
def test_a_resume_that_changes_what_a_run_can_take_applies_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    finished: tuple[Path, Path],
    override: str,
    key: str,
) -> None:
    config, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    args = ["train", str(config), override, "trainer.n_epochs=2", "--resume", str(run)]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert "resuming with new values of" in err and "trainer.n_epochs" in err
    assert key in err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["progress"]["epoch"] == 2
    if override == "trainer.lr=0.2":  # the checkpoint's optimizer groups took the new value
        assert state["optimizer"]["param_groups"][0]["lr"] == 0.2
    assert json.loads(out) == json.loads((run / "scores.json").read_text())


def test_resume_and_overwrite_together_are_refused(
    capsys: pytest.CaptureFixture[str], finished: tuple[Path, Path]
) -> None:
    config, run = finished
    code, _, err = _run(capsys, "train", str(config), "--resume", str(run), "--overwrite")
    assert code == 2 and "--resume and --overwrite exclude each other" in err


# ---------------------------------------------------------------- reused run directories


def _used(run: Path, what: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if what.endswith("/"):
        (run / what).mkdir()
        (run / what / "x").write_text("old")
    else:
        (run / what).write_text("old")


USED = ["checkpoints/", "vocab/", "metrics.jsonl", "events.out.tfevents.1.host", "config.yaml"]


@pytest.mark.parametrize("what", USED)
def test_a_new_run_into_a_directory_holding_a_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    run = tmp_path / "run"
    _used(run, what)
    files = _files(run)
    config = write_config(tmp_path / "c.yaml", tiny_config(n_epochs=1))
    code, _, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == 2
    assert f"run directory '{run}' already holds a run ({what}" in err
    assert f"--resume {run}" in err and "--overwrite" in err
    assert _files(run) == files


def test_overwrite_clears_the_old_run_and_keeps_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished: tuple[Path, Path]
) -> None:
    _, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "notes.txt").write_text("mine")
    old_best = (run / "checkpoints" / "best.pt").read_bytes()
    cfg = tiny_config(n_epochs=1, lr=0.2)  # no checkpoint_metric: no best.pt of its own
    other = write_config(tmp_path / "other.yaml", cfg)
    code, _, err = _run(capsys, "train", str(other), f"trainer.run_dir={run}", "--overwrite")
    assert code == 0, err
    assert not (run / "checkpoints" / "best.pt").exists(), "the old run's best.pt survived"
    assert old_best and (run / "notes.txt").read_text() == "mine"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_directory_with_only_other_files_takes_a_new_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "README").write_text("my notes")
    config = write_config(tmp_path / "c.yaml", tiny_config(n_epochs=1))
    code, _, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == 0, err
    assert (run / "README").read_text() == "my notes" and (run / "checkpoints").is_dir()


def test_a_run_dir_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.write_text("not a directory")
    config = write_config(tmp_path / "c.yaml", tiny_config(n_epochs=1))
    code, _, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == 2 and f"run directory '{run}' is a file" in err


# ---------------------------------------------------------------- refused runs leave nothing


def _bad_data(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    cfg = tiny_config(n_epochs=1, **trainer)
    cfg["runs_root"] = str(tmp_path / "runs")
    cfg["data"]["datasets"]["circles"] = {
        "source": {"type": "table", "path": str(tmp_path / "missing.npz")},
        "fields": {"xy": "x"},
        "labels": {"circle_task": "y"},
    }
    return cfg


@pytest.mark.parametrize("fixed", [False, True], ids=["timestamped", "fixed"])
def test_a_data_error_leaves_no_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed: bool
) -> None:
    config = write_config(tmp_path / "c.yaml", _bad_data(tmp_path))
    run = tmp_path / "fixed" / "run"
    extra = [f"trainer.run_dir={run}"] if fixed else []
    code, _, err = _run(capsys, "train", str(config), *extra, "--quiet")
    assert code == 2 and "missing.npz" in err
    assert not run.exists()
    assert not (tmp_path / "runs" / "tiny").exists() or not any(
        (tmp_path / "runs" / "tiny").iterdir()
    )


def _reviews(tmp_path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = []
    for i in range(40):
        label = int(rng.integers(2))
        text = " ".join(rng.choice(words[:3] if label else words[3:], size=3).tolist())
        rows.append({"text": text, "label": label, "split": "train" if i < 32 else "valid"})
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "modules": {
            "bag": {"type": "embedding_bag", "num_embeddings": 20, "embedding_dim": 4},
            "head": {"type": "torch.nn.Linear", "in_features": 4, "out_features": 2},
        },
        "tasks": {
            "sentiment": {
                "ops": [
                    {"module": "bag", "inputs": [["_input_", "text"]]},
                    {"module": "head", "inputs": ["bag"]},
                ]
            }
        },
        "data": {
            "batch_size": 8,
            "datasets": {
                "reviews": {
                    "source": {
                        "type": "table",
                        "path": "reviews.jsonl",
                        "split_column": "split",
                        "text": {"text": {"vocab_size": 20}},
                    },
                    "fields": {"text": "text"},
                    "labels": {"sentiment": "label"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "lr": 0.1, "progress_bar": False},
    }


def test_a_refused_run_writes_no_vocabulary_and_the_corrected_retry_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "r.yaml", _reviews(tmp_path))
    run = tmp_path / "run"
    bad = "trainer.checkpoint_metric=sentiment/reviews/valid/acuracy"
    code, _, err = _run(capsys, "train", str(config), bad, f"trainer.run_dir={run}", "--quiet")
    assert code == 2 and "acuracy" in err
    assert not run.exists()
    good = "trainer.checkpoint_metric=sentiment/reviews/valid/accuracy"
    code, _, err = _run(capsys, "train", str(config), good, f"trainer.run_dir={run}", "--quiet")
    assert code == 0, err
    assert (run / "vocab" / "reviews.text.json").is_file()


def test_a_refused_run_into_an_existing_empty_directory_leaves_it_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "r.yaml", _reviews(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    bad = "trainer.checkpoint_metric=sentiment/reviews/valid/nope"
    code, _, err = _run(capsys, "train", str(config), bad, f"trainer.run_dir={run}", "--quiet")
    assert code == 2 and "nope" in err
    assert run.is_dir() and list(run.iterdir()) == []


# ---------------------------------------------------------------- locks


def test_a_locked_run_directory_refuses_a_second_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished: tuple[Path, Path]
) -> None:
    config, done = finished
    files = _files(done)
    with RunLock(done):  # held here, as another process would hold it
        code, _, err = _run(capsys, "train", str(config), "--resume", str(done), "--quiet")
    assert code == 2
    assert f"run directory '{done}' is in use by process {os.getpid()} on " in err
    assert _files(done) == files


@pytest.mark.parametrize("content", ["999999999 gone-host\n", "garbage", ""])
def test_a_stale_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(content)  # left by a killed process: nobody holds it
    config = write_config(tmp_path / "c.yaml", tiny_config(n_epochs=1))
    code, _, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == 0, err
    assert not (run / LOCK_FILE).exists()  # released at the end


# ---------------------------------------------------------------- signals inside the CLI


_SIGNAL_HOOK = """
import os
from mtlgraph import Hook

class SignalAt(Hook):
    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_step_end(self, run):
        if run.global_step == self.step:
            os.kill(os.getpid(), self.sig)
"""


SIGNAL_CASES = [
    (signal.SIGINT, {}, 130),
    (signal.SIGTERM, {}, 143),
    (signal.SIGINT, {"checkpoint_every": 1, "checkpoint_unit": "epochs"}, 130),
    (signal.SIGTERM, {"checkpoint_every": 2, "checkpoint_unit": "steps"}, 143),
    (signal.SIGTERM, {"evaluation_freq": 1, "evaluation_unit": "steps"}, 143),
]


@pytest.mark.parametrize(("sig", "trainer", "status"), SIGNAL_CASES)
def test_a_signal_writes_last_pt_and_prints_the_resume_command(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sig: signal.Signals,
    trainer: dict[str, Any],
    status: int,
) -> None:
    (tmp_path / "sighook_bad_runs.py").write_text(_SIGNAL_HOOK)
    cfg = tiny_config(n_epochs=2, **trainer)
    cfg["imports"] = ["sighook_bad_runs"]
    cfg["trainer"]["hooks"] = [{"name": "sighook_bad_runs.SignalAt", "step": 3, "sig": int(sig)}]
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == status
    last = run / "checkpoints" / "last.pt"
    assert err.strip().endswith(
        f"mtlgraph: stopped by {sig.name} after step 3; checkpoint written: {last}; "
        f"resume with: mtlgraph train {config} trainer.run_dir={run} --resume {run}"
    )
    assert out == "" and not (run / LOCK_FILE).exists()
    assert torch.load(last, weights_only=True)["run"]["progress"]["global_step"] == 3


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_while_checkpointing_is_exit_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(obj: object, fh: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    config = write_config(tmp_path / "c.yaml", tiny_config(n_epochs=1))
    run = tmp_path / "run"
    code, _, err = _run(capsys, "train", str(config), f"trainer.run_dir={run}", "--quiet")
    assert code == 1
    last = run / "checkpoints" / "last.pt"
    assert f"cannot write checkpoint '{last}': No space left on device" in err
    assert not last.exists() and list((run / "checkpoints").iterdir()) == []


_TERM_ON_BUILD = """
import os, signal
from torch import nn
from mtlgraph.graph import MODULES

class TermOnBuild(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent while the run sets up

MODULES.register("term_on_build", TermOnBuild)
"""


@pytest.mark.parametrize("fixed", [False, True], ids=["timestamped", "fixed"])
def test_sigterm_during_set_up_leaves_no_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed: bool
) -> None:
    (tmp_path / "term_on_build_runs.py").write_text(_TERM_ON_BUILD)
    cfg = tiny_config(n_epochs=1)
    cfg["runs_root"] = str(tmp_path / "runs")
    cfg["imports"] = ["term_on_build_runs"]
    cfg["modules"]["circle_head"]["type"] = "term_on_build"
    config = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "fixed"
    extra = [f"trainer.run_dir={run}"] if fixed else []
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = _run(capsys, "train", str(config), *extra, "--quiet")
    assert code == 143 and out == ""
    assert err.strip() == "mtlgraph: terminated (SIGTERM); training had not started"
    assert not run.exists() and not (tmp_path / "runs" / "tiny").exists()
    assert signal.getsignal(signal.SIGTERM) is before
