"""``mtlgraph sweep`` and ``baselines``: separate processes, one directory per run, finished runs
skipped, a killed sweep resumed; single-task configs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from experiment_helpers import cli_command, cli_env
from report_helpers import write_tiny

from mtlgraph.experiment.config import load_config
from mtlgraph.experiment.sweep import (
    baseline_specs,
    grid_specs,
    parse_grid,
    shard,
    single_task_config,
)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def test_grid_runs_and_shards(tiny_config_file: Path, tmp_path: Path) -> None:
    grid = parse_grid(["trainer.lr=0.05,0.1", "trainer.balancer=sum,mgda"])
    specs = grid_specs(tiny_config_file, ["trainer.n_epochs=1"], grid, [0, 1], tmp_path)
    names = [s.run_dir.name for s in specs]
    assert len(names) == len(set(names)) == 8
    assert names[0] == "trainer.lr=0.05_trainer.balancer=sum_seed=0"
    assert specs[0].overrides[-2:] == ("seed=0", "trainer.seed=0")
    assert "--resume" not in specs[0].command()
    (specs[0].run_dir / "checkpoints").mkdir(parents=True)
    (specs[0].run_dir / "checkpoints" / "last.pt").touch()  # a killed run: resumed
    assert specs[0].command()[-2:] == ["--resume", str(specs[0].run_dir)]
    parts = [shard(specs, f"{i}/3") for i in range(3)]
    assert sorted(s.run_dir for p in parts for s in p) == sorted(s.run_dir for s in specs)


def test_single_task_config_keeps_its_modules_and_data(tiny_config_file: Path) -> None:
    cfg = yaml.safe_load(tiny_config_file.read_text())
    one = single_task_config(cfg, "square_task")
    assert sorted(one["modules"]) == ["square_head", "trunk"]
    assert list(one["data"]["datasets"]) == ["squares"]
    assert one["trainer"] == cfg["trainer"] and one["seed"] == cfg["seed"]


def test_sweep_resumes_after_a_kill(tiny_config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = cli_command(
        "sweep", str(tiny_config_file), "trainer.n_epochs=1",
        "--grid", "trainer.balancer=sum,mgda", "--seeds", "0", "--jobs", "1", "--out", str(out),
    )  # fmt: skip
    first = out / "trainer.balancer=sum_seed=0"
    proc = subprocess.Popen(
        args, env=cli_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (first / "scores.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the first run never finished"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep; its run gets SIGTERM from the system
    proc.wait()
    deadline = time.monotonic() + 120
    while list(out.glob("*/.mtlgraph.lock")):  # the orphaned run stops (checkpoint, lock freed)
        assert time.monotonic() < deadline, "a run kept training after its sweep was killed"
        time.sleep(0.1)
    done = (first / "scores.json").stat().st_mtime_ns
    assert not (out / "trainer.balancer=mgda_seed=0" / "scores.json").exists()

    again = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"skip {first} (finished)" in again.stderr
    assert (first / "scores.json").stat().st_mtime_ns == done  # not trained again
    assert (out / "trainer.balancer=mgda_seed=0" / "scores.json").is_file()
    assert "| trainer.balancer=sum |" in again.stdout
    assert "| trainer.balancer=mgda |" in again.stdout


def test_a_terminated_sweep_stops_its_runs_with_a_checkpoint(
    tiny_config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = cli_command(
        "sweep", str(tiny_config_file), "trainer.n_epochs=500",
        "--grid", "trainer.balancer=sum", "--seeds", "0", "--jobs", "1", "--out", str(out),
    )  # fmt: skip
    run = out / "trainer.balancer=sum_seed=0"
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never logged"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the sweep alone, as `timeout` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "run the same command again to continue" in err.decode()
    assert (run / "checkpoints" / "last.pt").is_file()  # the run stopped with a checkpoint
    assert not (run / ".mtlgraph.lock").exists()  # and ended: nothing trains on


def test_baselines_are_single_task_runs_of_each_seed(
    tiny_config_file: Path, tmp_path: Path
) -> None:
    specs = baseline_specs(tiny_config_file, ["trainer.n_epochs=1"], [0, 1], tmp_path)
    names = [s.run_dir.name for s in specs]
    assert names == [f"task={t}_seed={k}" for t in ("circle_task", "square_task") for k in (0, 1)]
    alone = load_config(specs[0].config, list(specs[0].overrides))  # what the run trains
    assert list(alone.tasks) == ["circle_task"] and sorted(alone.modules) == [
        "circle_head",
        "trunk",
    ]
    assert list(alone.data.datasets) == ["circles"]
    assert (alone.trainer.n_epochs, alone.seed, alone.trainer.seed) == (1, 0, 0)
    assert specs[0].command()[-2:] == [f"trainer.run_dir={specs[0].run_dir}", "--quiet"]
