"""Bad-input corpus, signals: SIGTERM and SIGINT while ``evaluate`` and ``export`` write their
file. Each case asserts the exit status docs/cli.md promises (130 SIGINT, 143 SIGTERM), the
message, that no temporary file is left and that an older file is intact."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from experiment_helpers import tiny_config, write_config

from mtlgraph.experiment.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny two-task config and a trained run."""
    root = tmp_path_factory.mktemp("tiny")
    config = write_config(root / "tiny.yaml", tiny_config(n_epochs=1))
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def _signal_while_writing(monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    """The atomic writer's ``os.fsync`` sends ``sig`` to this process: it arrives while the
    temporary file is complete and not yet renamed into place."""
    from mtlgraph import _io

    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(_io.os, "fsync", fsync)


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_during_export_leaves_the_older_program_and_no_temporary(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sig: signal.Signals,
    status: int,
    said: str,
) -> None:
    config, run = tiny
    out = tmp_path / "m.pt2"
    out.write_bytes(b"the older program")
    before = signal.getsignal(sig)
    _signal_while_writing(monkeypatch, sig)
    code = main(["export", str(config), "--checkpoint", str(run), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == status, err
    assert err.strip() == f"mtlgraph: {said}; '{out}' keeps its older content"
    assert out.read_bytes() == b"the older program"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert signal.getsignal(sig) is before


def test_sigterm_during_evaluate_writes_no_scores_and_no_temporary(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, run = tiny
    out = tmp_path / "scores.json"
    _signal_while_writing(monkeypatch, signal.SIGTERM)
    code = main(["evaluate", str(config), "--checkpoint", str(run), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 143, captured.err
    assert captured.err.strip() == "mtlgraph: terminated (SIGTERM)"
    assert captured.out == "" and list(tmp_path.iterdir()) == []
