"""Training on streams: mixing with in-memory data, SIGKILL + resume equal to an uninterrupted
run (num_workers 0 and 2), and the errors of a stream without steps_per_epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import pytest
from stream_jobs import CONFIG, params, setup

from mtlgraph import ConfigError, Trainer
from mtlgraph.training.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _killed_run(run_dir: Path, workers: int) -> None:
    """Run stream_jobs.main in a subprocess and SIGKILL it (its whole process group: the
    DataLoader workers too) once it blocks after a checkpoint."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "stream_jobs.py"), str(run_dir), str(workers)],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    try:
        while not (run_dir / "blocked").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never blocked"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_and_resume_of_a_stream_equals_an_uninterrupted_run(
    tmp_path: Path, workers: int
) -> None:
    model, loaders = setup(workers)
    reference = Trainer(run_dir=str(tmp_path / "ref"), **CONFIG)
    reference.fit(model, loaders)
    expected = params(model)

    run = tmp_path / "run"
    _killed_run(run, workers)
    saved = load_checkpoint(run)
    progress = saved["run"]["progress"]
    assert 0 < progress["global_step"] < 24
    cursor = saved["run"]["streams"][0][0]
    assert cursor["workers"] == max(workers, 1) and any(p[2] for p in cursor["positions"])

    model, loaders = setup(workers)
    resumed = Trainer(run_dir=str(run), **CONFIG)
    resumed.fit(model, loaders, resume_from=run)
    got = params(model)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert resumed.history == reference.history
    assert resumed.global_step == reference.global_step == 24


def test_a_stream_needs_a_sampling_scheduler_and_steps_per_epoch() -> None:
    model, loaders = setup(0)
    config = {k: v for k, v in CONFIG.items() if not k.startswith("checkpoint")}
    with pytest.raises(ConfigError, match="steps_per_epoch: required with stream 's'"):
        Trainer(**{**config, "steps_per_epoch": None}).fit(model, loaders)
    with pytest.raises(ConfigError, match="training dataset 's' is a stream of unknown length"):
        Trainer(**{**config, "steps_per_epoch": None, "batch_scheduler": "shuffled"}).fit(
            model, loaders
        )
    with pytest.raises(ConfigError, match="steps_per_epoch is set but batch_scheduler"):
        Trainer(**{**config, "batch_scheduler": "mixed"}).fit(model, loaders[1:])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_ranks_by_two_workers_split_a_stream_and_resume_exactly(tmp_path: Path) -> None:
    import multiprocessing as mp
    import socket

    from stream_jobs import ddp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [  # not daemons: a rank starts DataLoader worker processes
        ctx.Process(target=ddp_worker, args=(rank, 2, port, str(tmp_path), queue))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + 300
    try:
        while len(results) < 2 and time.monotonic() < deadline:
            try:
                rank, value = queue.get(timeout=1.0)
                results[rank] = value
            except Empty:
                if all(not p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ids0, ids1 = results[0]["ids"], results[1]["ids"]
    # 6 units over 2 ranks x 2 workers: every example once, no rank or worker overlapping
    assert sorted(ids0 + ids1) == sorted(100 * u + r for u in range(6) for r in range(10))
    for rank in (0, 1):
        assert results[rank]["cut"] == "interrupted"
        (ref, ref_history), (got, got_history) = results[rank]["ref"], results[rank]["resume"]
        assert all(np.array_equal(ref[k], got[k]) for k in ref)
        assert ref_history == got_history
    ref0, ref1 = results[0]["ref"][0], results[1]["ref"][0]
    assert all(np.array_equal(ref0[k], ref1[k]) for k in ref0)  # DDP kept the ranks in step
