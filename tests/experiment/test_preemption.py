"""SIGTERM and SIGINT during ``mtlgraph train`` with default settings (no ``checkpoint_every``):
the step in progress finishes, ``last.pt`` is written, the printed command resumes, and the
resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from experiment_helpers import cli_command, cli_env, tiny_config, write_config

from mtlgraph.experiment.cli import main

_PAUSE = """
import os, pathlib, time
from torch import nn
from mtlgraph.graph import MODULES

class PauseOnce(nn.Module):
    '''Identity. With $PAUSE_AT set to a file: on the training call `at`, write FILE.paused and
    wait (up to a minute) for FILE.go.'''

    def __init__(self, at: int = 7):
        super().__init__()
        self.at, self.seen = at, 0

    def forward(self, x):
        target = os.environ.get("PAUSE_AT")
        if target and self.training:
            self.seen += 1
            if self.seen == self.at:
                pathlib.Path(target + ".paused").write_text("paused")
                go, deadline = pathlib.Path(target + ".go"), time.monotonic() + 60
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        return x

MODULES.register("pause_once", PauseOnce)
"""


@pytest.fixture(scope="module")
def preempt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config with default checkpoint settings, and its uninterrupted run directory."""
    tmp = tmp_path_factory.mktemp("preempt")
    (tmp / "pause_preempt.py").write_text(_PAUSE)
    cfg = tiny_config(n_epochs=2)
    cfg["imports"] = ["pause_preempt"]
    cfg["data"]["shuffle"] = True
    cfg["modules"]["trunk"]["dropout"] = 0.2  # draws from torch's generator every step
    cfg["modules"]["gate"] = {"type": "pause_once", "at": 7}
    for task in cfg["tasks"].values():
        task["ops"].insert(1, {"module": "gate", "inputs": ["trunk"]})
        task["ops"][2]["inputs"] = ["gate"]
    config = write_config(tmp / "c.yaml", cfg)
    ref = tmp / "ref"
    assert main(["train", str(config), f"trainer.run_dir={ref}", "--quiet"]) == 0
    return config, ref


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_and_the_resume_is_bit_identical(
    preempt: tuple[Path, Path],
    sig: signal.Signals,
    status: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, ref = preempt
    run = config.parent / f"run-{sig.name}"
    marker = config.parent / f"pause-{sig.name}"
    proc = subprocess.Popen(
        cli_command("train", str(config), f"trainer.run_dir={run}", "--quiet"),
        env={**cli_env(), "PAUSE_AT": str(marker)},
        cwd=config.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not Path(f"{marker}.paused").exists():  # inside the 7th training forward
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training never reached the pause"
        time.sleep(0.02)
    proc.send_signal(sig)
    time.sleep(0.2)  # the handler runs while the step waits
    Path(f"{marker}.go").write_text("go")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    last = run / "checkpoints" / "last.pt"
    assert f"mtlgraph: stopped by {sig.name} after step 7; checkpoint written: {last}" in err
    assert out == "" and not (run / "scores.json").exists()
    state = torch.load(last, weights_only=True)
    assert state["run"]["progress"]["global_step"] == 7  # the step in progress finished
    assert not (run / ".mtlgraph.lock").exists()

    command = re.search(r"resume with: (.*)$", err.strip(), re.MULTILINE)
    assert command is not None, err
    args = shlex.split(command.group(1))
    assert args[:3] == ["mtlgraph", "train", str(config)] and args[-2:] == ["--resume", str(run)]
    assert main([*args[1:], "--quiet"]) == 0  # in this process: quicker than a new one
    resumed = capsys.readouterr().out
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["run"]["history"] == b["run"]["history"]
    assert a["run"]["progress"] == b["run"]["progress"]
    assert (ref / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert json.loads(resumed) == json.loads((ref / "scores.json").read_text())


def test_a_second_process_on_a_running_directory_is_refused_and_a_killed_ones_lock_is_free(
    preempt: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = preempt
    run = config.parent / "run-locked"
    marker = config.parent / "pause-locked"
    proc = subprocess.Popen(
        cli_command("train", str(config), f"trainer.run_dir={run}", "--quiet"),
        env={**cli_env(), "PAUSE_AT": str(marker)},
        cwd=config.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not Path(f"{marker}.paused").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training never reached the pause"
            time.sleep(0.02)
        for extra in (["--resume", str(run)], [f"trainer.run_dir={run}"]):
            assert main(["train", str(config), *extra, "--quiet"]) == 2
            err = capsys.readouterr().err
            assert f"run directory '{run}' is in use by process {proc.pid} on " in err
    finally:
        proc.kill()  # SIGKILL: no clean-up, the lock file stays behind
        proc.wait(timeout=60)
    assert (run / ".mtlgraph.lock").read_text().split()[0] == str(proc.pid)
    code = main(["train", str(config), f"trainer.run_dir={run}", "--overwrite", "--quiet"])
    assert code == 0, capsys.readouterr().err  # the dead holder's lock is taken over
    assert not (run / ".mtlgraph.lock").exists() and (run / "scores.json").is_file()
