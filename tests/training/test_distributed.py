"""Distributed helpers on 2 gloo ranks (CPU), bounded by timeouts."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from ddp_workers import (
    dying_worker,
    resume_worker,
    sharding_worker,
    small_data,
    small_model,
    train_worker,
)

from mtlgraph import DictDataLoader
from mtlgraph.training.distributed import DistEnv, backend_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_env_detection() -> None:
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.enabled) == (
        3,
        4,
        1,
        False,
        True,
    )


def test_backend_choice() -> None:
    import torch

    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


@pytest.mark.timeout(120)
def test_sharding_and_gathered_evaluation_equal_single_process() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        sharding_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn"
    )
    results = sorted(queue.get(timeout=60) for _ in range(2))
    model = small_model()
    valid = DictDataLoader(small_data(23, "valid"), batch_size=5)
    expected_scores = model.score(valid)
    expected = model.predict(valid, return_preds=True)
    for _rank, n_batches, n_rows, scores, full in results:
        assert n_batches == 3 and n_rows == 12  # ceil(23 / 2) rows each, padded
        assert scores == expected_scores
        assert full["probs"] == expected["probs"]["a"].tolist()


def _spawn(fn, *args, nprocs: int = 2):  # type: ignore[no-untyped-def]
    """Start ``fn(rank, *args)`` in ``nprocs`` spawned processes; return them (not joined)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(rank, *args), daemon=True) for rank in range(nprocs)]
    for p in procs:
        p.start()
    return procs


def _collect(queue, n: int, procs, timeout: float = 240.0) -> list:  # type: ignore[no-untyped-def]
    import queue as queue_mod
    import time

    items, deadline = [], time.monotonic() + timeout
    while len(items) < n:
        try:
            items.append(queue.get(timeout=1.0))
        except queue_mod.Empty:
            if time.monotonic() > deadline or all(not p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(timeout=30)
    return items


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_train_identically_and_evaluate_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from ddp_workers import SCENARIOS, train_setup

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = _spawn(train_worker, 2, free_port(), str(tmp_path), queue)
    items = _collect(queue, 2 * len(SCENARIOS), procs)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(items) == 2 * len(SCENARIOS)
    by = {(name, rank): (state, history, wrote) for name, rank, state, history, wrote in items}
    for name in SCENARIOS:
        s0, h0, wrote0 = by[(name, 0)]
        s1, h1, wrote1 = by[(name, 1)]
        # bit-identical parameters on both ranks (they started from different weights)
        assert all(np.array_equal(s0[k], s1[k]) for k in s0), name
        # same gathered scores and rank-averaged losses on every rank (rank 0 alone probes)
        assert [r for r in h0 if not any("diagnostics/" in k for k in r)] == h1, name
        # only rank 0 wrote files
        assert wrote0 and not wrote1, name
        run0 = tmp_path / name / "rank0"
        assert (run0 / "metrics.jsonl").is_file() and (run0 / "checkpoints" / "last.pt").is_file()
        assert (run0 / "diagnostics.json").is_file() == (name == "diagnostics")
        # the distributed evaluation equals a single-process evaluation of the same model
        model, loaders = train_setup(init_seed=0)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in s0.items()})
        single = model.score([dl for dl in loaders if dl.dataset.split == "valid"])
        assert {k: h0[-1][k] for k in single} == single, name
        assert 0 < h0[-1]["model/all/train/loss"] < 1.0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_under_ddp_is_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ddp_workers import RESUMED_BALANCERS

    ctx = mp.get_context("spawn")
    results = {}
    for phase in ("ref", "cut", "resume"):
        queue = ctx.Queue()
        procs = _spawn(resume_worker, 2, free_port(), str(tmp_path), phase, queue)
        for _phase, balancer, rank, value in _collect(queue, 2 * len(RESUMED_BALANCERS), procs):
            results[(phase, balancer, rank)] = value
        assert [p.exitcode for p in procs] == [0, 0], phase
    for balancer in RESUMED_BALANCERS:
        assert results[("cut", balancer, 0)] == results[("cut", balancer, 1)] == "interrupted"
        for rank in (0, 1):
            (ref, ref_history), (got, got_history) = (
                results[("ref", balancer, rank)],
                results[("resume", balancer, rank)],
            )
            assert all(np.array_equal(ref[k], got[k]) for k in ref), (balancer, rank)
            assert ref_history == got_history, (balancer, rank)


@pytest.mark.timeout(200)
def test_a_dead_rank_ends_the_job_with_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.monotonic()
    procs = _spawn(dying_worker, 2, free_port(), queue)
    items = dict(_collect(queue, 1, procs, timeout=120.0))
    assert procs[1].exitcode == 3  # died abruptly
    assert procs[0].exitcode not in (0, None)  # failed, did not hang or finish
    assert items[0] != "finished"
    assert time.monotonic() - start < 120


def test_an_off_trainer_runs_no_collective_inside_a_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collectives follow the Trainer's own environment, not whether a group exists."""
    import torch
    import torch.distributed as dist

    from mtlgraph import Trainer

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    calls: list[str] = []
    try:
        for name in ("all_reduce", "all_gather_object", "barrier", "broadcast_object_list"):
            real = getattr(dist, name)

            def record(*args: object, _name: str = name, _real: object = real, **kw: object):  # type: ignore[no-untyped-def]
                calls.append(_name)
                return _real(*args, **kw)  # type: ignore[operator]

            monkeypatch.setattr(dist, name, record)
        torch.manual_seed(0)
        model = small_model()
        loaders = [
            DictDataLoader(small_data(32, "train"), batch_size=8),
            DictDataLoader(small_data(16, "valid"), batch_size=8),
        ]
        trainer = Trainer(
            n_epochs=2,
            progress_bar=False,
            distributed="off",
            run_dir=str(tmp_path / "run"),
            checkpoint_every=1,
            balancer="uncertainty",
        )
        trainer.fit(model, loaders)
        assert trainer.global_step == 8 and len(trainer.history) == 2
        assert calls == []
    finally:
        dist.destroy_process_group()


def test_a_block_shuffled_loader_sharded_over_ranks_keeps_the_block_order() -> None:
    """Each rank takes every other row of the one block order (windows of both ranks' batches
    of a step): together the ranks read every row once, a step's rows from whole blocks."""
    import torch

    from mtlgraph import DictDataset
    from mtlgraph.training.distributed import shard_train_loader

    ds = DictDataset("d", "train", {"x": torch.arange(48.0)[:, None]}, {"t": torch.arange(48)})
    loader = DictDataLoader(ds, batch_size=4, shuffle=True, seed=2, shuffle_block=4)
    shards = [shard_train_loader(loader, DistEnv(rank, 2, rank)) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    rows = [[y["t"].tolist() for _, y in shard] for shard in shards]
    steps = [rows[0][i] + rows[1][i] for i in range(len(rows[0]))]
    assert sorted(r for step in steps for r in step) == list(range(48))
    assert all(len({r // 4 for r in step}) == 2 for step in steps)  # 8 rows: 2 whole blocks


@pytest.mark.timeout(300)
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ddp_workers import signal_worker

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = _spawn(signal_worker, 2, free_port(), str(tmp_path), queue)
    items = _collect(queue, 4, procs)
    assert len(items) == 4 and set(items) == {
        (0, 3, "SIGTERM"),  # rank 0 got no signal, and stopped after the same step
        (0, "handler", True),  # the default handler is back
        (1, 3, "SIGTERM"),
        (1, "handler", True),
    }
    assert (tmp_path / "rank0" / "checkpoints" / "last.pt").is_file()  # rank 0 writes it
    assert not (tmp_path / "rank1").exists()
